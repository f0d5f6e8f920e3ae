"""Preference rows in any accepted format -> one canonical pair (or a reject with its reason).

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

JSON and JSONL files are read record by record (`sources.json_records` into `JSON_RECORD`) and each
record is parsed on its own here, so one record with other types, another format or invalid UTF-8 is one
reject, not a failed file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raydpo.errors import one_line

if TYPE_CHECKING:
    pass

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
