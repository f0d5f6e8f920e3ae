"""Data files: fingerprinted by their contents (a copy elsewhere or a `touch` keeps the cache key, one
changed byte does not), and CSV read as JSON, JSON Lines and Parquet are, local and on s3://."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import write_jsonl

import raydpo
from raydpo import digests
from raydpo.data import parse_row
from raydpo.errors import RaydpoError
from raydpo.sources import csv_records, find_files

MAX_LENGTH = 256
COLUMNS = ["prompt", "chosen", "rejected"]


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch) -> list[str]:
    """A digest cache of the test's own; the list of local files hashed (read) through it."""
    monkeypatch.setenv(digests.DIGEST_CACHE_ENV, str(tmp_path / "digests"))
    hashed = []
    real = digests.file_sha256
    monkeypatch.setattr(digests, "file_sha256", lambda path: hashed.append(str(path)) or real(path))
    return hashed


@pytest.fixture(scope="module")
def text_rows(en_rows) -> list[dict]:
    """Standard-format rows from the sample data, cut short: commas, quotes and line breaks in the cells."""
    quoted = {"prompt": 'Say "hi", then\nstop.', "chosen": ' "Hi", I said.', "rejected": " No,\r\nthanks."}
    return [quoted] + [
        {
            "prompt": "\n".join(turn["value"] for turn in row["conversations"])[:300],
            "chosen": row["chosen"]["value"][:300],
            "rejected": row["rejected"]["value"][:300],
        }
        for row in en_rows[30:35]
    ]


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def touch(path: Path) -> None:
    """New modification and change times, a second later than the file had."""
    later = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(later, later))


def test_a_copy_or_a_touch_keeps_the_fingerprint_and_one_byte_changes_it(text_rows, tmp_path, digest_cache):
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", text_rows[:3])
    write_jsonl(folder / "b.jsonl", text_rows[3:])
    original = find_files(str(folder)).fingerprint
    contents = [(folder / name).read_bytes() for name in ("a.jsonl", "b.jsonl")]
    assert original == {
        "kind": "files",
        "format": "json",
        "files": [hashlib.sha256(content).hexdigest() for content in contents],
    }
    assert find_files(str(folder)).fingerprint == original and len(digest_cache) == 2  # read once

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, copy)
    for path in (*folder.iterdir(), *copy.iterdir()):
        touch(path)
    assert find_files(str(copy)).fingerprint == original
    assert find_files(str(folder)).fingerprint == original and len(digest_cache) == 6  # read again

    data = bytearray((copy / "b.jsonl").read_bytes())
    data[20] ^= 1  # one byte, the size unchanged
    (copy / "b.jsonl").write_bytes(bytes(data))
    changed = find_files(str(copy)).fingerprint
    assert changed["files"][0] == original["files"][0] and changed["files"][1] != original["files"][1]


def test_a_folder_mixing_csv_and_json_is_refused(text_rows, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", text_rows[:1])
    write_csv(tmp_path / "b.csv", text_rows[1:2])
    with pytest.raises(RaydpoError, match="mixes CSV and JSON files; point to one kind"):
        find_files(str(tmp_path))


def run(toy_model, dataset: Path | str, output: Path):
    return raydpo.precompute(
        model=str(toy_model), dataset=str(dataset), output=str(output), max_length=MAX_LENGTH
    )


def frame(result):
    return raydpo.read_output(result.output).to_pandas().set_index("pair_id").sort_index()


def test_csv_gives_the_pairs_of_jsonl_and_a_moved_copy_is_a_cache_hit(
    ray_session, toy_model, text_rows, tmp_path
):
    reference = frame(run(toy_model, write_jsonl(tmp_path / "rows.jsonl", text_rows), tmp_path / "ref"))
    data = write_csv(tmp_path / "rows.csv", text_rows)
    result = run(toy_model, data, tmp_path / "out")
    assert result.train.counts.written == len(text_rows) == len(reference)
    got = frame(result)
    assert list(got.index) == list(reference.index)  # the same pairs: the ids hash the same text
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert got[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-5)

    moved = tmp_path / "moved" / "pairs.csv"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    touch(moved)
    again = run(toy_model, moved, tmp_path / "out")
    assert again.train.cached and again.train.manifest.key == result.train.manifest.key


def test_csv_without_a_column_is_one_line(ray_session, toy_model, text_rows, tmp_path):
    data = write_csv(tmp_path / "rows.csv", text_rows, columns=["prompt", "chosen"])
    with pytest.raises(RaydpoError) as caught:
        run(toy_model, data, tmp_path / "out")
    message = str(caught.value)
    assert "needs 'chosen' and 'rejected' columns" in message and "it has: chosen, prompt" in message
    assert "\n" not in message
    assert not (tmp_path / "out" / "train").exists()


def test_csv_on_s3_is_read_and_fingerprinted_by_content(s3_server, text_rows, tmp_path, monkeypatch):
    """An object's digest is the content's, as a local copy's is (its ETag keeps a rerun from reading
    it); its rows come out as the local file's."""
    s3 = pafs.S3FileSystem(endpoint_override=s3_server)
    body = write_csv(tmp_path / "rows.csv", text_rows).read_bytes()
    with s3.open_output_stream("raydpo/prefs/rows.csv") as out:
        out.write(body)
    streamed = []
    real = digests._stream_sha256
    monkeypatch.setattr(digests, "_stream_sha256", lambda *args: streamed.append(1) or real(*args))

    files = find_files("s3://raydpo/prefs/rows.csv")
    assert files.kind == "csv" and files.fingerprint["files"] == [hashlib.sha256(body).hexdigest()]
    assert find_files("s3://raydpo/prefs/rows.csv").fingerprint == files.fingerprint and len(streamed) == 1
    assert find_files(str(tmp_path / "rows.csv")).fingerprint == files.fingerprint
    s3.copy_file("raydpo/prefs/rows.csv", "raydpo/copied/rows.csv")  # another ETag, the same content
    assert find_files("s3://raydpo/copied/rows.csv").fingerprint == files.fingerprint

    records = csv_records({"path": files.paths[0], "file_index": 0}, files.filesystem)
    assert [parse_row(record) for record in records] == text_rows
    with s3.open_output_stream("raydpo/prefs/rows.csv") as out:
        out.write(body.replace(b"prompt", b"prompT", 1))
    assert find_files("s3://raydpo/prefs/rows.csv").fingerprint != files.fingerprint
