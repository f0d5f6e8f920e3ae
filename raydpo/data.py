"""Preference data in: sources -> Ray Dataset, and rows in any accepted format -> one canonical pair.

Formats (the ones TRL's DPOTrainer accepts, plus ShareGPT):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: the same keys holding lists of messages (`role`, `content` as a string or a list of text
  parts, and whatever else the chat template reads: `tool_calls`, `reasoning_content`, `name`, ...), with
  optional `tools` and `chat_template_kwargs` columns passed to the chat template as TRL passes them;
- implicit prompt: only `chosen` and `rejected`; the prompt is their shared prefix (TRL's `extract_prompt`);
- ShareGPT: `conversations` (`{"from", "value"}` turns, optional `system` column) with `chosen` and `rejected`
  each one `{"from": "gpt", "value"}` message (or a list of them).
A row that fits none of them, or that has images (raydpo trains text-only models), becomes a reject with a
reason; it is never dropped silently.

JSON and JSONL files are read record by record (`JSON_RECORD`) and each record is parsed on its own, so
one record with other types, another format or invalid UTF-8 is one reject, not a failed file.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydpo.errors import RaydpoError, one_line

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "observation": "tool",
    "tool": "tool",
}
PREFERENCE_KEYS = ("chosen", "rejected")
IMAGE_COLUMNS = ("image", "images")  # TRL's sign of a vision dataset
# apply_chat_template's arguments that tokenization sets itself; TRL fails on a row whose kwargs repeat them
TOKENIZATION_ARGUMENTS = ("conversation", "tokenize", "return_dict", "add_generation_prompt")
JSON_RECORD = "_raydpo_json_record"  # the raw bytes of one JSON record, parsed by `parse_row`
# Every input row's position in the source, carried from the reader to the output (`source_row`):
# `file_index << FILE_SHIFT | record` for files (in the fingerprint's sorted order), the row's index for a
# Hugging Face or Ray dataset. It orders the rows ("first occurrence" of a duplicate id is the smallest)
# and lets a resumed run skip whole ranges of rows already written.
SOURCE_ROW = "_raydpo_source_row"
FILE_SHIFT = 32


Message = dict[str, Any]  # a chat message: `role`, `content` and any other key the chat template reads


@dataclass(frozen=True)
class CanonicalPair:
    """One preference pair in TRL's explicit-prompt form: all strings, or all message lists.

    A conversational pair also carries the row's `tools` and `chat_template_kwargs` (empty for text).
    """

    pair_id: str
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


class RowError(ValueError):
    """A row that cannot become a pair; its message is the reject reason."""


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the formats see it: a raw JSON record is parsed here (or raises `RowError`)."""
    if JSON_RECORD not in row:
        return row
    not_text = "not valid UTF-8 text (invalid bytes or a lone surrogate escape)"
    try:
        value = json.loads(row[JSON_RECORD].decode("utf-8"))
    except UnicodeDecodeError:
        raise RowError(not_text) from None
    except json.JSONDecodeError as error:
        raise RowError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise RowError(f"a JSON record that is not an object (a {type(value).__name__})")
    try:  # an escape such as "\ud800" (or a JSON array's invalid bytes) gives a lone surrogate: not text
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(not_text) from None
    return value


def row_text(row: dict[str, Any]) -> str:
    """The row as JSON text for the rejects file: a raw record as it was in the file."""
    if JSON_RECORD in row:
        return row[JSON_RECORD].decode("utf-8", "replace")
    return json.dumps(row, ensure_ascii=False, default=str)


def canonical_pair(row: dict[str, Any], id_column: str | None = None) -> CanonicalPair:
    """Turn one input row of any accepted format into a `CanonicalPair`, or raise `RowError`.

    The content hash (`pair_id` without `id_column`) covers everything that reaches the tokenizer: the
    messages with all their keys, `tools` and `chat_template_kwargs`.
    """
    if any(row.get(column) not in (None, []) for column in IMAGE_COLUMNS):
        raise RowError("the row has images; raydpo trains text-only models")
    prompt, chosen, rejected = _prompt_chosen_rejected(row)
    tools, template_kwargs = _template_inputs(row) if isinstance(chosen, list) else (None, {})
    content = _content_json(prompt, chosen, rejected, tools, template_kwargs)
    pair_id = _digest(content) if id_column is None else _id_value(row, id_column)
    return CanonicalPair(pair_id, prompt, chosen, rejected, tools, template_kwargs)


def _prompt_chosen_rejected(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The row's prompt, chosen and rejected in TRL's explicit-prompt form, checked."""
    if "conversations" in row and row.get("conversations") is not None:
        conversation = sharegpt_to_conversational(row)
        prompt, chosen, rejected = (conversation[key] for key in ("prompt", "chosen", "rejected"))
    elif row.get("prompt") is not None:
        prompt = _text_or_messages(row["prompt"], "prompt")
        chosen = _text_or_messages(_require(row, "chosen"), "chosen")
        rejected = _text_or_messages(_require(row, "rejected"), "rejected")
    else:
        chosen = _text_or_messages(_require(row, "chosen"), "chosen")
        rejected = _text_or_messages(_require(row, "rejected"), "rejected")
        if type(chosen) is not type(rejected):
            raise RowError("chosen and rejected mix text and messages")
        prompt, chosen, rejected = extract_prompt(chosen, rejected)

    kinds = {type(prompt), type(chosen), type(rejected)}
    if len(kinds) != 1:
        raise RowError("prompt, chosen and rejected mix text and messages")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if _is_blank(value):
            raise RowError(f"empty {name} completion")
    if isinstance(prompt, list) and not prompt:
        raise RowError("empty prompt (no messages)")
    return prompt, chosen, rejected


def _template_inputs(row: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """A conversational row's `tools` and `chat_template_kwargs`, as TRL hands them to the chat template.

    `tools` is a list of tool schemas, or a JSON string of one (TRL parses it; in Parquet or a Hugging
    Face dataset a string keeps each row's schemas as they are, where a column of structs gives every row
    the keys of all rows, as nulls). `chat_template_kwargs` is a mapping; absent or null means none.
    """
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise RowError(f"tools is a string but not valid JSON: {error}") from None
    if tools is not None and not (
        isinstance(tools, (list, tuple)) and all(isinstance(tool, dict) for tool in tools)
    ):
        raise RowError("tools is not a list of tool schemas (JSON objects)")
    template_kwargs = row.get("chat_template_kwargs")
    if template_kwargs is None:
        template_kwargs = {}
    if not isinstance(template_kwargs, dict) or not all(isinstance(key, str) for key in template_kwargs):
        raise RowError("chat_template_kwargs is not a mapping of names to values")
    repeated = sorted(set(template_kwargs) & set(TOKENIZATION_ARGUMENTS))
    if repeated:
        raise RowError(f"chat_template_kwargs sets {repeated[0]!r}, which tokenization sets itself")
    return (None if tools is None else list(tools)), dict(template_kwargs)


def _content_json(prompt: Any, chosen: Any, rejected: Any, tools: Any, template_kwargs: dict) -> str:
    """The pair's content as canonical JSON, what the content hash digests (raises `RowError` if a value
    is not JSON). Without tools and kwargs it is the prompt, chosen and rejected alone, so such pairs
    keep the ids they had before raydpo read tools."""
    content = [prompt, chosen, rejected]
    if tools is not None or template_kwargs:
        content += [tools, template_kwargs]
    try:
        return json.dumps(content, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise RowError(f"the row holds a value that is not JSON: {one_line(error)}") from None


def sharegpt_to_conversational(row: dict[str, Any]) -> dict[str, list[Message]]:
    """A ShareGPT row in TRL's conversational format: `prompt`, `chosen` and `rejected` message lists.

    The `conversations` turns (after the `system` column, if any) make the prompt; `from` names map to
    roles by `SHAREGPT_ROLES`. Raises `RowError` for a row that is not ShareGPT.
    """
    prompt = _sharegpt_messages(_require(row, "conversations"), "conversations")
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RowError("system is not a string")
        if system.strip():
            prompt = [{"role": "system", "content": system}, *prompt]
    return {
        "prompt": prompt,
        "chosen": _sharegpt_messages(_require(row, "chosen"), "chosen"),
        "rejected": _sharegpt_messages(_require(row, "rejected"), "rejected"),
    }


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """The shared prefix of chosen and rejected becomes the prompt, exactly as TRL's `extract_prompt`."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # noqa: B007 - idx is used after the loop, as in TRL
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def reject_id(row: dict[str, Any], id_column: str | None) -> str:
    """An id for a row that could not be parsed: the user's id if readable, else a hash of the raw row."""
    if id_column and isinstance(row.get(id_column), (str, int)) and not isinstance(row.get(id_column), bool):
        return str(row[id_column])
    return _digest(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False))


def _id_value(row: dict[str, Any], id_column: str) -> str:
    value = row.get(id_column)
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"id column {id_column!r} is missing or not a string/integer")
    value = str(value)
    if not value.strip():
        raise RowError(f"id column {id_column!r} is empty")
    return value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _require(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing {key}")
    return value


def _is_blank(value: str | list[Message]) -> bool:
    """Blank text, or messages of blank text and nothing else (a tool call or a reasoning is something)."""
    if isinstance(value, str):
        return not value.strip()
    return all(set(message) <= {"role", "content"} and not _text(message).strip() for message in value)


def _text(message: Message) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


def _text_or_messages(value: Any, name: str) -> str | list[Message]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return [_message(item, name) for item in value]
    raise RowError(f"{name} is neither a string nor a list of messages")


def _message(item: Any, name: str) -> Message:
    """A message with all its keys but those whose value is null: transformers drops them before the
    template renders (and Arrow gives every message the keys of all messages of its column, as nulls)."""
    if not isinstance(item, dict):
        raise RowError(f"{name} holds a message that is not a {{role, content}} mapping")
    role = item.get("role")
    if role not in ROLES:
        raise RowError(f"{name} holds a message with missing or unknown role {role!r}")
    message = {key: value for key, value in item.items() if value is not None}
    _check_content(message, name)
    return message


def _check_content(message: Message, name: str) -> None:
    """Content as TRL's text models take it: a string, a list of text parts, or none beside tool calls."""
    content = message.get("content")
    if isinstance(content, str) or (content is None and message.get("tool_calls")):
        return
    if isinstance(content, (list, tuple)) and content and all(isinstance(part, dict) for part in content):
        kinds = {part.get("type") for part in content} - {"text"}
        if kinds and all(isinstance(kind, str) for kind in kinds):
            raise RowError(
                f"{name} holds a content part of type {sorted(kinds)[0]!r}; raydpo takes text parts only"
            )
        if not kinds and all(isinstance(part.get("text"), str) for part in content):
            return
    raise RowError(f"{name} holds a message whose content is not a string or a list of text parts")


def _sharegpt_messages(value: Any, name: str) -> list[Message]:
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, (list, tuple)) or not turns:
        raise RowError(f"{name} is not a non-empty list of ShareGPT turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise RowError(f"{name} holds a turn that is not a {{from, value}} mapping")
        if turn.get("role") is not None:  # already in role/content form (Arrow gives absent keys as None)
            messages.append(_message(turn, name))
            continue
        speaker, content = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"{name} holds a turn with missing or unknown 'from' {speaker!r}")
        if not isinstance(content, str):
            raise RowError(f"{name} holds a turn whose value is not a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    return messages


# ---- sources ---------------------------------------------------------------------------------------------

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def open_source(source: str | ray.data.Dataset, split: str = "train") -> tuple[ray.data.Dataset, dict]:
    """Open a preference data source as a Ray Dataset of numbered rows (`SOURCE_ROW`), with a fingerprint
    of what was opened.

    Files are fingerprinted by path, size and modification time (cheap, and changes whenever the data
    does); a Hugging Face dataset by its own fingerprint; an in-memory Ray Dataset by its content.
    """
    import ray.data

    if isinstance(source, ray.data.Dataset):
        # digested before numbering: a dataset's blocks may have different columns (rows of `from_items`
        # with and without `tools`), and dropping the number column would project every block to the first's
        materialized = source.materialize()
        return _numbered(materialized), {
            "kind": "ray_dataset",
            "content": dataset_content_digest(materialized),
        }
    if not isinstance(source, str) or not source:
        raise RaydpoError("dataset must be a path, a URI or a ray.data.Dataset")

    files, filesystem = _list_files(source)
    if files is None:
        return _open_hf(source, split)
    formats = {FILE_FORMATS.get(_suffix(info.path)) for info in files} - {None}
    if not formats:
        raise RaydpoError(f"no .json, .jsonl or .parquet files under {source}")
    if len(formats) > 1:
        raise RaydpoError(f"{source} mixes JSON and Parquet files; point to one kind")
    unread = [info.base_name for info in files if _suffix(info.path) in UNREAD_DATA_SUFFIXES]
    if unread:  # rows in them would be left out without a word
        shown = ", ".join(unread[:3]) + (f" and {len(unread) - 3} more" if len(unread) > 3 else "")
        raise RaydpoError(
            f"{source} also holds data files raydpo does not read ({shown}): convert them to JSON, JSONL "
            "or Parquet, or move them out"
        )
    paths = [info.path for info in files if _suffix(info.path) in FILE_FORMATS]
    fingerprint = {
        "kind": "files",
        "files": [[info.path, info.size, info.mtime_ns] for info in files if info.path in paths],
    }
    if formats == {"json"}:
        listing = ray.data.from_items(
            [{"path": path, "file_index": index} for index, path in enumerate(paths)],
            override_num_blocks=len(paths),
        )
        return listing.flat_map(json_records, fn_kwargs={"filesystem": filesystem}), fingerprint
    return _read_parquet_numbered(paths, filesystem), fingerprint


def json_records(file: dict[str, Any], filesystem=None) -> list[dict[str, Any]]:
    """Split one JSON or JSONL file into raw records: a top-level array's items, else its non-blank lines.

    Records stay bytes until `parse_row`, so types may differ between records (Arrow's JSON reader wants
    one schema per file) and a record with invalid UTF-8 spoils only itself. An array that does not
    parse is one record, and so one reject with the parser's reason. Each record is numbered
    (`SOURCE_ROW`) by its file's index and its place in the file.
    """
    with filesystem.open_input_stream(file["path"]) as stream:
        data = stream.read().removeprefix(codecs.BOM_UTF8)
    if data.lstrip()[:1] != b"[":
        records = [line for line in data.split(b"\n") if line.strip()]
    else:
        try:
            records = [
                json.dumps(item).encode() for item in json.loads(data.decode("utf-8", "surrogateescape"))
            ]
        except json.JSONDecodeError:
            records = [data]
    base = file["file_index"] << FILE_SHIFT
    return [{JSON_RECORD: record, SOURCE_ROW: base + index} for index, record in enumerate(records)]


def _read_parquet_numbered(paths: list[str], filesystem) -> ray.data.Dataset:
    """Parquet files read a row group per block, each row numbered by its file and place in the file."""
    import pyarrow.parquet as pq
    import ray.data

    pieces = []
    for file_index, path in enumerate(paths):  # footers only: the cost grows with the files, not the rows
        metadata = pq.read_metadata(path, filesystem=filesystem)
        offset = file_index << FILE_SHIFT
        for group in range(metadata.num_row_groups):
            pieces.append({"path": path, "row_group": group, "first": offset})
            offset += metadata.row_group(group).num_rows
    if not pieces:
        raise RaydpoError(f"no rows in {', '.join(paths)}")
    listing = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    return listing.map_batches(
        _read_row_groups, batch_size=1, batch_format="pyarrow", fn_kwargs={"filesystem": filesystem}
    )


def _read_row_groups(pieces, filesystem) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for piece in pieces.to_pylist():
        table = pq.ParquetFile(piece["path"], filesystem=filesystem).read_row_group(piece["row_group"])
        rows = pa.array(range(piece["first"], piece["first"] + table.num_rows), pa.int64())
        tables.append(table.append_column(SOURCE_ROW, rows))
    return pa.concat_tables(tables)


def _numbered(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """A Ray Dataset's rows numbered in its block order (it is materialized once for that)."""
    import ray
    import ray.data

    number = ray.remote(_number_block)
    refs, first = [], 0
    for bundle in dataset.materialize().iter_internal_ref_bundles():
        for block, metadata in zip(bundle.block_refs, bundle.metadata, strict=True):
            refs.append(number.remote(block, first))
            first += metadata.num_rows
    return ray.data.from_arrow_refs(refs)


def _number_block(block, first: int):
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    rows = pa.array(range(first, first + table.num_rows), pa.int64())
    return table.append_column(SOURCE_ROW, rows)


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot >= 0 else ""


def _list_files(source: str):
    """Files under a local path or pyarrow URI; (None, None) if it is not a file or folder of data files."""
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(source)
    except (ValueError, TypeError):  # a plain path; pyarrow's ArrowInvalid is a ValueError
        filesystem, path = pafs.LocalFileSystem(), source
    if isinstance(filesystem, pafs.LocalFileSystem):
        path = str(Path(path).resolve())
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info], filesystem
    if info.type != pafs.FileType.Directory:
        if not is_hub_id(source):
            raise RaydpoError(f"dataset not found: {source}")
        return None, None  # a name for datasets.load_dataset
    if filesystem.get_file_info(f"{path}/dataset_info.json").type == pafs.FileType.File:
        return None, None  # saved with datasets.save_to_disk
    if _is_dataset_repo(filesystem, path):
        return None, None  # a hub dataset repository checked out locally: its card says how to load it
    selector = pafs.FileSelector(path, recursive=True)
    files = [
        entry
        for entry in filesystem.get_file_info(selector)
        if entry.type == pafs.FileType.File and not entry.base_name.startswith((".", "_"))
    ]
    return sorted(files, key=lambda entry: entry.path), filesystem


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DATA_SUFFIXES = (*FILE_FORMATS, ".csv", ".txt", ".arrow", ".gz", ".zst")
UNREAD_DATA_SUFFIXES = (".csv", ".arrow", ".gz", ".zst")  # in a folder: data left out unless refused


def is_hub_id(source: str) -> bool:
    """Whether a source that is not an existing file or folder reads as a Hugging Face hub dataset id.

    Hub ids are `name` or `org/name` of letters, digits, `-`, `_` and `.` (`org/name-2.5-data` is one);
    a URI, a path starting with `/`, `.` or `~`, a deeper path, or a name ending in a data file's suffix
    is a path that does not exist.
    """
    return (
        HUB_ID.fullmatch(source) is not None
        and ".." not in source
        and not source.lower().endswith(DATA_SUFFIXES)
    )


def _is_dataset_repo(filesystem, path: str) -> bool:
    import pyarrow.fs as pafs

    card = f"{path}/README.md"
    if filesystem.get_file_info(card).type != pafs.FileType.File:
        return False
    with filesystem.open_input_stream(card) as stream:
        head = stream.read(65536).decode("utf-8", "replace")
    front_matter = head.split("---")[1] if head.startswith("---") and head.count("---") >= 2 else ""
    return "configs:" in front_matter


def _open_hf(source: str, split: str) -> tuple[ray.data.Dataset, dict]:
    import datasets
    import ray.data

    try:
        try:
            loaded = datasets.load_from_disk(source)
        except FileNotFoundError:
            loaded = datasets.load_dataset(source)
    except Exception as error:  # datasets raises many kinds; all mean "could not open"
        raise RaydpoError(f"could not open dataset {source!r}: {one_line(error)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise RaydpoError(f"dataset {source!r} has no split {split!r} (has: {', '.join(loaded)})")
        loaded = loaded[split]
    if loaded._indices is not None:  # a select/shuffle view: materialize the rows it points to
        loaded = loaded.flatten_indices()
    # from_arrow, not from_huggingface: the latter asks the hub for Parquet files of datasets it
    # believes come from there, which a local or offline dataset does not have.
    import pyarrow as pa

    table = loaded.data.table
    rows_per_block = max(1, min(table.num_rows, 1024))
    blocks = [
        table.slice(start, rows_per_block).append_column(
            SOURCE_ROW, pa.array(range(start, min(start + rows_per_block, table.num_rows)), pa.int64())
        )
        for start in range(0, table.num_rows, rows_per_block)
    ]
    return ray.data.from_arrow(blocks or [table]), {"kind": "huggingface", "fingerprint": loaded._fingerprint}


def dataset_content_digest(dataset: ray.data.Dataset) -> str:
    """An order-independent digest of a Ray Dataset's rows: one cheap pass, no model.

    Each row hashes to two 32-bit numbers; their sums (which cannot overflow int64 below 2**31 rows) and
    the row count make the digest.
    """

    def row_digests(batch: Any) -> dict[str, Any]:
        import numpy as np

        hashes = [
            hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).digest()
            for row in batch.to_dict("records")
        ]
        return {
            "high": np.asarray([int.from_bytes(h[:4], "big") for h in hashes], dtype=np.int64),
            "low": np.asarray([int.from_bytes(h[4:8], "big") for h in hashes], dtype=np.int64),
            "one": np.ones(len(hashes), dtype=np.int64),
        }

    sums = dataset.map_batches(row_digests, batch_format="pandas").sum(["high", "low", "one"]) or {}
    return "{}:{:x}:{:x}".format(*(int(sums.get(f"sum({key})", 0) or 0) for key in ("one", "high", "low")))
