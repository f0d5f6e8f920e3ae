"""Bad input to `raydpo precompute`, generated with hypothesis: every row is written or rejected with a reason.

Each example writes one JSONL file (or one JSON array) that mixes valid rows of every accepted format with
generated bad rows, then runs the real precompute on the tiny model. The outcome must be a finished
output in which rows in = rows written + rows rejected, each row lands where its kind says (a valid row
in data/, a bad one in rejects/ with a one-line reason), no row is lost or written twice, and no file is
created outside the output, whatever the ids hold. Input that no row can come from stops before any
scoring with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, to_conversational
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raydpo
from raydpo import cache
from raydpo.errors import RaydpoError
from raydpo.toy import sample_data_dir

AREA = "precompute input"
MAX_LENGTH = 256
SHORT_ROWS = [
    row
    for row in json.loads((sample_data_dir() / "dpo_en_demo.json").read_text(encoding="utf-8"))
    if sum(len(turn["value"]) for turn in row["conversations"]) < 300
][:20]
ID_PREFIXES = ["r", "../r", "/tmp/r", "a/b/../../../r", "r\\..\\"]  # ids that look like paths
DUPLICATE_REASON = "duplicate pair_id: an earlier row has the same id"
CATEGORIES = {
    "input-01-missing-columns": "missing columns (`chosen` or `rejected` left out of a row)",
    "input-02-extra-columns": "extra columns of any JSON type",
    "input-03-wrong-types": "wrong types (numbers, booleans, objects, lists where text or messages belong)",
    "input-04-empty-strings": "empty and whitespace-only strings",
    "input-05-long-strings": "very long strings (20,000 characters)",
    "input-06-invalid-utf8": "invalid UTF-8 bytes, lone surrogate escapes, lines that are not JSON objects",
    "input-07-malformed-messages": "malformed message lists (missing or unknown role, content not a string)",
    "input-08-mixed-formats": "standard, conversational, ShareGPT and implicit-prompt rows in one file",
    "input-09-duplicate-ids": "duplicated ids",
    "input-10-bad-ids": "ids missing, empty, of the wrong type, or shaped like paths (`../`, `/`)",
}


@dataclass(frozen=True)
class Row:
    """One generated record: its bytes in the file, and where it must land."""

    category: str
    line: bytes
    valid: bool
    pair_id: str | None  # the id it is written or rejected under; None: unreadable, rejected under a digest
    reason: str = ""  # a pattern its reject reason must match (bad rows only)


# ---- row generators --------------------------------------------------------------------------------------

blank = st.sampled_from(["", " ", "\n\t ", "\u3000", "\u00a0\u2003"])
words = st.text(max_size=40)
nonblank = st.text(min_size=1, max_size=40).filter(lambda text: text.strip())
wrong_value = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def valid_row(draw, pair_id) -> tuple[str, dict]:
    """A row in one of the four accepted formats."""
    kind = draw(st.sampled_from(["standard", "conversational", "sharegpt", "implicit"]))
    if kind == "standard":
        return kind, {
            "id": pair_id,
            "prompt": draw(words),
            "chosen": draw(nonblank),
            "rejected": draw(nonblank),
        }
    if kind == "implicit":
        question = draw(words)
        return kind, {"id": pair_id, "chosen": f"{question} Yes.", "rejected": f"{question} No."}
    sample = copy.deepcopy(draw(st.sampled_from(SHORT_ROWS)))
    row = to_conversational(sample) if kind == "conversational" else sample
    return kind, {"id": pair_id, **row}


@st.composite
def bad_row(draw, category: str, pair_id: str) -> tuple[dict | bytes, bool, str]:
    """(the row or its raw line, whether it is valid, the pattern of its reject reason)."""
    kind, row = draw(valid_row(pair_id))
    if category == "input-01-missing-columns":
        side = draw(st.sampled_from(["chosen", "rejected"]))
        del row[side]
        return row, False, f"^missing {side}$"
    if category == "input-02-extra-columns":
        extra = st.dictionaries(
            st.text(max_size=8).filter(lambda key: key not in (*row, "prompt", "conversations", "system")),
            st.one_of(wrong_value, st.none(), words),
            min_size=1,
            max_size=3,
        )
        return {**row, **draw(extra)}, True, ""
    if category == "input-03-wrong-types":
        fields = (
            ["conversations", "system", "chosen", "rejected"]
            if kind == "sharegpt"
            else ["chosen", "rejected"]
        )
        fields += ["prompt"] if kind in ("standard", "conversational") else []
        row[draw(st.sampled_from(fields))] = draw(wrong_value)
        return row, False, ""
    if category == "input-04-empty-strings":
        if kind == "standard" and draw(st.booleans()):
            return {**row, "prompt": draw(blank)}, True, ""  # an empty prompt is allowed; completions are not
        side = draw(st.sampled_from(["chosen", "rejected"]))
        if kind in ("standard", "implicit"):
            row[side] = draw(blank)
        elif kind == "conversational":
            row[side][-1]["content"] = draw(blank)
        else:
            row[side]["value"] = draw(blank)
        return row, False, "^empty (chosen|rejected) completion$"
    if category == "input-05-long-strings":
        unit = draw(st.sampled_from(["word ", "長い文 ", "x", "🙂 "]))
        side = draw(st.sampled_from(["prompt", "chosen"]))
        row = {"id": pair_id, "prompt": "Say it.", "chosen": "Yes.", "rejected": "No.", side: unit * 20_000}
        row[side] = row[side][:20_000]
        return row, side == "chosen", "^prompt fills max_length"  # a long completion is cut, not rejected
    if category == "input-06-invalid-utf8":
        head = b'{"id": ' + json.dumps(pair_id).encode() + b', "prompt": "p", "rejected": "no", "chosen": "'
        variant = draw(st.sampled_from(["bytes", "surrogate", "not-json", "not-object"]))
        if variant == "bytes":
            bad = draw(st.sampled_from([b"\xff", b"caf\xe9", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"]))
            return head + b"ok " + bad + b'"}', False, "^not valid UTF-8 text"
        if variant == "surrogate":
            return head + b'\\ud800 yes"}', False, "^not valid UTF-8 text"
        if variant == "not-json":
            return head + b"unterminated", False, "^not valid JSON"
        other = draw(st.sampled_from([b"[1, 2]", b'"text"', b"42", b"null", b"true"]))
        return other, False, "^a JSON record that is not an object"
    if category == "input-07-malformed-messages":
        if kind in ("standard", "implicit"):
            kind, row = (
                "conversational",
                {"id": pair_id, **to_conversational(draw(st.sampled_from(SHORT_ROWS)))},
            )
        if kind == "sharegpt":
            side = draw(st.sampled_from(["conversations", "chosen"]))
            turn = (
                row[side][draw(st.integers(0, len(row[side]) - 1))] if side == "conversations" else row[side]
            )
            field, names = "from", "'from'"
            content = "value"
        else:
            side = draw(st.sampled_from(["prompt", "chosen", "rejected"]))
            turn = row[side][draw(st.integers(0, len(row[side]) - 1))]
            field, names = "role", "role"
            content = "content"
        fault = draw(
            st.sampled_from(["no-role", "unknown-role", "content-type", "no-content", "not-mapping"])
        )
        if fault == "no-role":
            del turn[field]
            return row, False, f"missing or unknown {names}"
        if fault == "unknown-role":
            turn[field] = draw(st.sampled_from(["wizard", "", "USER", "bot", 3]))
            return row, False, f"missing or unknown {names}"
        if fault in ("content-type", "no-content"):
            turn[content] = draw(wrong_value) if fault == "content-type" else None
            return row, False, "is not a string"
        position = row[side].index(turn) if isinstance(row[side], list) else None
        if position is None:
            row[side] = [draw(st.sampled_from(["text", 1]))]
        else:
            row[side][position] = draw(st.sampled_from(["text", 1, None]))
        return row, False, "not a \\{(role, content|from, value)\\} mapping"
    if category == "input-08-mixed-formats":
        return row, True, ""
    if category == "input-10-bad-ids":
        value = draw(st.sampled_from(["missing", None, 1.5, True, "", "  ", [1], {"a": 1}, 7]))
        if value == "missing":
            del row["id"]
        else:
            row["id"] = value
        return row, value == 7, "^id column 'id' is (missing|empty)"  # an integer id is a valid id
    raise AssertionError(category)


@st.composite
def datasets(draw) -> tuple[str, list[Row]]:
    """A file's worth of rows: valid rows of mixed formats and bad rows of any category, in any order."""
    count = draw(st.integers(3, 9))
    rows: list[Row] = []
    for index in range(count):
        pair_id = f"{draw(st.sampled_from(ID_PREFIXES))}{index}"
        earlier = [row for row in rows if row.valid]
        categories = sorted(
            set(CATEGORIES) - {"input-09-duplicate-ids"} | ({"input-09-duplicate-ids"} if earlier else set())
        )
        category = draw(st.sampled_from(categories)) if index else "input-08-mixed-formats"
        if category == "input-09-duplicate-ids":
            pair_id = draw(st.sampled_from(earlier)).pair_id
            _, value = draw(valid_row(pair_id))
            rows.append(Row(category, _line(value), True, pair_id))
            continue
        value, valid, reason = draw(bad_row(category, pair_id))
        line = value if isinstance(value, bytes) else _line(value)
        rows.append(Row(category, line, valid, _landing_id(line), reason))
    rows = draw(st.permutations(rows))
    as_array = all(_is_json(row.line) for row in rows) and draw(st.booleans())
    return ("json" if as_array else "jsonl"), rows


def _line(value: dict) -> bytes:
    """Long rows are written as UTF-8, the rest with escapes: the reader must take both."""
    return json.dumps(value, ensure_ascii=len(json.dumps(value)) < 1000).encode("utf-8")


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8", "surrogateescape"))  # as the reader parses a JSON array
    except ValueError:
        return False
    return True


def _landing_id(line: bytes) -> str | None:
    """The pair id a row is written or rejected under: its id if readable (as `reject_id` takes it)."""
    try:
        value = json.loads(line.decode("utf-8"))
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError):
        return None
    if not isinstance(value, dict):
        return None
    pair_id = value.get("id")
    return str(pair_id) if isinstance(pair_id, (str, int)) and not isinstance(pair_id, bool) else None


def write_dataset(folder: Path, kind: str, rows: list[Row]) -> Path:
    path = folder / f"rows.{kind}"
    if kind == "json":
        path.write_bytes(b"[\n" + b",\n".join(row.line for row in rows) + b"\n]\n")
    else:
        path.write_bytes(b"\n".join(row.line for row in rows) + b"\n")
    return path


# ---- the property ----------------------------------------------------------------------------------------


def check_output(output: Path, rows: list[Row], counts: cache.Counts) -> dict[str, Counter]:
    """Every row where its kind says, once; returns the reject reasons seen per category."""
    split = output / "train"
    written = pq.read_table(split / "data", columns=["pair_id"]).column("pair_id").to_pylist()
    rejects = pq.read_table(split / "rejects").to_pylist()
    assert counts.read == len(rows) == counts.written + counts.rejected
    assert (len(written), len(rejects)) == (counts.written, counts.rejected)
    assert len(set(written)) == len(written), "a pair id was written twice"
    for reject in rejects:
        assert reject["reason"] and "\n" not in reject["reason"], reject

    rejected_by_id: dict[str, list[str]] = defaultdict(list)
    for reject in rejects:
        rejected_by_id[reject["pair_id"]].append(reject["reason"])
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row.pair_id is not None:
            groups[row.pair_id].append(row)
    assert set(written) <= set(groups), "a row was written under an id it does not have"
    reasons: dict[str, Counter] = defaultdict(Counter)
    for pair_id, group in groups.items():
        kept = written.count(pair_id)
        assert kept == any(row.valid for row in group), (pair_id, group)
        assert kept + len(rejected_by_id[pair_id]) == len(group), f"{pair_id!r} lost or duplicated"
        if len(group) == 1 and not group[0].valid:
            assert re.search(group[0].reason, rejected_by_id[pair_id][0]), (group[0], rejected_by_id[pair_id])
        bad = next((row.category for row in group if not row.valid), group[-1].category)
        for reason in rejected_by_id[pair_id]:
            reasons["input-09-duplicate-ids" if reason == DUPLICATE_REASON else bad][reason] += 1
    unreadable = [row for row in rows if row.pair_id is None]
    anonymous = [
        reason for pair_id, found in rejected_by_id.items() if pair_id not in groups for reason in found
    ]
    assert len(anonymous) == len(unreadable), "a row without a readable id was lost or duplicated"
    for row in unreadable:
        assert any(re.search(row.reason, reason) for reason in anonymous), (row, anonymous)
        reasons[row.category][next(reason for reason in anonymous if re.search(row.reason, reason))] += 1
    for path in split.rglob("*"):  # whatever the ids look like, files are named by digests
        if path.is_file():
            relative = path.relative_to(split).as_posix()
            assert re.fullmatch(
                r"manifest\.json|data/_common_metadata|(data|rejects)/(dup-)?part-[0-9a-f]{24}\.parquet",
                relative,
            ), relative
    return reasons


SEEN: dict[str, dict] = {key: {"rows": 0, "written": 0, "reasons": Counter()} for key in CATEGORIES}
EXAMPLES = 12


@settings(
    derandomize=True,
    database=None,
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(dataset=datasets())
def test_generated_bad_rows_are_written_or_rejected_never_lost(
    ray_session, toy_model, tmp_path, reliability, dataset
):
    kind, rows = dataset
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    source = write_dataset(folder, kind, rows)
    result = raydpo.precompute(
        model=str(toy_model),
        dataset=str(source),
        output=str(folder / "out"),
        id_column="id",
        max_length=MAX_LENGTH,
    )
    reasons = check_output(folder / "out", rows, result.train.counts)
    assert sorted(path.name for path in folder.iterdir()) == sorted(["out", source.name])  # nothing escaped
    for row in rows:
        SEEN[row.category]["rows"] += 1
        SEEN[row.category]["written"] += row.valid
    for category, found in reasons.items():
        SEEN[category]["reasons"].update(found)
    record_seen(reliability)  # after every example: the rows hold the totals once the last one passed


def record_seen(reliability) -> None:
    for key, fault in CATEGORIES.items():
        seen = SEEN[key]
        reasons = "; ".join(f"{reason} ({count})" for reason, count in sorted(seen["reasons"].items()))
        reliability.record(
            key,
            AREA,
            fault,
            f"hypothesis ({EXAMPLES} derandomized examples): JSONL or JSON-array files of 3-9 rows mixing valid "
            "rows of every format with generated bad ones; `raydpo.precompute` on the toy model, id_column=id",
            f"{seen['rows']} rows of this kind ({seen['written']} of them valid); reject reasons: "
            f"{reasons or 'none'}. Every run: rows read = written + rejected, each row where its kind says, "
            "lost 0, written twice 0, no file outside the output",
        )


# ---- input no row can come from: one line, exit code 2, before scoring -----------------------------------

UNUSABLE = {
    "empty file": (b"", "the dataset is empty"),
    "blank lines only": (b"\n  \n\t\n", "the dataset is empty"),
    "no preference columns": (
        b'{"question": "q", "answer": "a"}\n' * 3,
        "needs 'chosen' and 'rejected' columns",
    ),
    "invalid UTF-8 throughout": (
        b"\xff\xfe\xfa\n\x80\x81\n",
        "could not read the dataset: none of its first 2",
    ),
    "truncated JSON array": (
        b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt"',
        "not valid JSON",
    ),
    "no id column": (
        b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n',
        "id column 'id' is not in the dataset",
    ),
}


def test_input_without_usable_rows_stops_with_one_line(ray_session, toy_model, tmp_path, reliability):
    observed = []
    for name, (payload, message) in UNUSABLE.items():
        path = tmp_path / f"{name.replace(' ', '-')}.{'json' if payload.startswith(b'[') else 'jsonl'}"
        path.write_bytes(payload)
        with pytest.raises(RaydpoError) as caught:
            raydpo.precompute(
                model=str(toy_model), dataset=str(path), output=str(tmp_path / "out"), id_column="id"
            )
        text = str(caught.value)
        assert message in text and "\n" not in text and "Traceback" not in text, text
        assert not (tmp_path / "out" / "train").exists(), "the output was started before the check"
        observed.append(f"{name}: '{text.replace(str(tmp_path) + '/', '')}'")
    reliability.record(
        "input-11-unusable-dataset",
        AREA,
        "a file no row can come from: " + ", ".join(UNUSABLE),
        "one small file per case; `raydpo.precompute(id_column='id')` on the toy model",
        "RaydpoError before any output or scoring, one line each: " + "; ".join(observed),
    )


def test_cli_bad_input_is_one_line_and_good_rows_survive_bad_ones(
    ray_session, toy_model, tmp_path, reliability
):
    """Through the real entry point, in a subprocess joined to the test's Ray instance."""
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}

    def cli(dataset: Path, output: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "raydpo.cli", "precompute", "--model", str(toy_model)]
        command += ["--dataset", str(dataset), "--output", str(tmp_path / output), "--ray-address", address]
        command += ["--max-length", str(MAX_LENGTH)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_bytes(b"\xff\xfe\n[1, 2]\n")
    failed = cli(unreadable, "o1")
    error_lines = [
        line for line in failed.stderr.splitlines() if line.startswith("raydpo precompute: error:")
    ]
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr and len(error_lines) == 1, failed.stderr

    good = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(
        b"\n".join(
            [
                json.dumps(good).encode(),
                json.dumps({**good, "chosen": 5}).encode(),  # a type the other rows do not have
                json.dumps(to_conversational(SHORT_ROWS[0])).encode(),  # another format
                b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # Latin-1, not UTF-8
            ]
        )
    )
    finished = cli(mixed, "o2")
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stdout + finished.stderr
    *_, summary, hint, log = finished.stdout.strip().splitlines()
    assert summary.startswith("train: 4 rows read, 2 written, 2 rejected"), finished.stdout
    assert hint == f"next: raydpo train --model {toy_model} --data {tmp_path / 'o2'}"
    assert log == f"full log: {next((tmp_path / 'o2' / 'logs').glob('precompute-*.log'))}"
    reliability.record(
        "input-12-cli",
        AREA,
        "bad input through the `raydpo precompute` command",
        "subprocess `python -m raydpo.cli precompute` on (a) a file of invalid UTF-8 and non-object lines, "
        "(b) a file mixing a valid standard row, a row with a number for `chosen`, a conversational row and "
        "a Latin-1 row",
        f"(a) exit {failed.returncode}: '{error_lines[0].replace(str(tmp_path) + '/', '')}', no traceback; "
        f"(b) exit {finished.returncode}: '{summary.split(';')[0]}', no traceback",
    )


def test_a_source_that_cannot_be_read_is_refused_before_ray_starts(toy_model, tmp_path):
    """A missing dataset, and a folder whose Arrow file would be left out, stop `raydpo precompute` with
    one line (exit 2) before a Ray instance is started or joined."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(SHORT_ROWS[0]) + "\n")
    (folder / "b.arrow").write_bytes(b"ARROW1")
    for dataset, line in (
        (tmp_path / "missing.jsonl", f"dataset not found: {tmp_path / 'missing.jsonl'}"),
        (folder, f"{folder} also holds data files raydpo does not read (b.arrow)"),
    ):
        ran = run_cli(
            "precompute",
            "--model",
            str(toy_model),
            "--dataset",
            str(dataset),
            "--output",
            str(tmp_path / "o"),
        )
        assert ran.returncode == 2, ran.stderr
        assert ran.stderr.strip().splitlines()[-1].startswith(f"raydpo precompute: error: {line}"), ran.stderr
        assert "Ray" not in ran.stderr, ran.stderr  # neither started nor joined
    assert not (tmp_path / "o").exists()


def test_paths_from_ids_and_manifests_stay_inside_the_output(tmp_path, reliability):
    """Part files are named by digests, never by ids; a manifest cannot point a reader outside its split."""
    names = [cache.part_name(ids) for ids in (["../../etc/passwd"], ["/abs/x", "a\\..\\b"], [""])]
    assert all(re.fullmatch(r"part-[0-9a-f]{24}\.parquet", name) for name in names)

    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"pair_id": ["x"]}), outside)
    split = tmp_path / "out" / "train"
    split.mkdir(parents=True)
    observed = []
    escapes = (
        "../../outside.parquet",
        f"data/../../../{outside.name}",
        str(outside),
        "data/part-x/../../../x",
    )
    for bad in escapes:
        manifest = {"format": cache.FORMAT, "schema_version": cache.SCHEMA_VERSION, "counts": {"written": 1}}
        manifest["files"] = [{"path": bad, "rows": 1}]
        (split / cache.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(RaydpoError, match="not a part file here"):
            cache.open_split(str(split))
        observed.append(bad.replace(str(tmp_path), "<tmp>"))
    reliability.record(
        "input-13-path-escape",
        AREA,
        "ids and manifest entries shaped like paths",
        "`cache.part_name` on ids such as `../../etc/passwd`; a manifest listing "
        + ", ".join(f"`{path}`" for path in observed),
        "part files are named `part-<24 hex>.parquet` whatever the ids; `open_split` refuses every such "
        "manifest entry with one line ('... which is not a part file here') before reading it",
    )


def test_manifest_round_trips_and_refuses_missing_or_unknown_fields(tmp_path):
    """The manifest is a typed contract: what is written reads back equal, and a manifest with a field
    missing, an unknown field or a nested field of the wrong kind is refused with one line naming it."""
    manifest = cache.Manifest(
        raydpo_version="0",
        key="k",
        split="train",
        source="pairs.jsonl",
        fingerprints=cache.Fingerprints(
            model={"weights_sha256": "w"}, tokenizer={"t": 1}, dataset={"kind": "files"}
        ),
        model="m",
        tokenizer="m",
        settings={"max_length": 8},
        counts=cache.Counts(
            read=2, written=1, rejected=1, truncated_this_run=0, resumed=0, reject_reasons={"r": 1}
        ),
        throughput=cache.Throughput(
            wall_time_s=1.0,
            tokens=10,
            tokens_per_s=10.0,
            pairs_per_s=1.0,
            padding_fraction=0.0,
            prefix_sharing="off",
            tokens_computed=10,
            tokens_saved_by_prefix_sharing=0,
            num_actors=1,
            batch_size=1,
        ),
        schema=("pair_id",),
        files=(cache.PartFile("data/part-0.parquet", 1), cache.PartFile("rejects/part-1.parquet", 1)),
        created_at="2026-01-01T00:00:00Z",
    )
    assert cache.Manifest.from_json(manifest.to_json(), "here") == manifest
    assert manifest.data_files == ["data/part-0.parquet"]
    values = manifest.to_dict()
    assert json.loads(manifest.to_json()) == values and values["files"][0] == {
        "path": "data/part-0.parquet",
        "rows": 1,
    }
    for broken, problem in (
        ({k: v for k, v in values.items() if k != "key"}, r"manifest lacks \['key'\]"),
        ({**values, "extra": 1}, r"manifest has unknown fields \['extra'\]"),
        ({**values, "counts": {**values["counts"], "lost": 0}}, r"counts has unknown fields \['lost'\]"),
        ({**values, "throughput": 3}, "'throughput' is not an object"),
        ({**values, "schema_version": 99}, "unsupported cache format"),
    ):
        with pytest.raises(RaydpoError, match=problem):
            cache.Manifest.from_json(json.dumps(broken), "here")
    with pytest.raises(RaydpoError, match="not valid JSON"):
        cache.Manifest.from_json(b"{", "here")
