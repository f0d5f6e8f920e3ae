"""Precompute bookkeeping that does not grow with the data: numbered input rows, duplicates resolved by
input order without a global set, resume by ranges of rows, counts from the part files' footers."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

import raydpo
from raydpo import cache
from raydpo.cache import RowRanges
from raydpo.precompute_stage.sink import DUPLICATE_REASON, part_metadata
from raydpo.sources import FILE_SHIFT, SOURCE_ROW, open_source

SETTINGS = {"id_column": "id", "rows_per_file": 1, "batch_size": 1, "sort_window": 1, "max_length": 256}


def test_row_ranges_merge_count_overlaps_and_answer_membership():
    first, second = RowRanges.of([5, 3, 4, 10, 11]), RowRanges.of([6, 7, 8, 11])
    assert first.starts.tolist() == [3, 10] and first.stops.tolist() == [6, 12] and first.rows == 5
    both = RowRanges.union([first, second])
    assert both.starts.tolist() == [3, 10] and both.stops.tolist() == [9, 12]  # touching ranges merge
    assert both.rows == 8 and both.overlap == 1  # row 11 is in both
    assert both.contains([2, 3, 8, 9, 11, 12]).tolist() == [False, True, True, False, True, False]
    assert RowRanges.of([1, 1, 2]).overlap == 1
    restored = RowRanges.from_json(both.to_json())
    assert restored.starts.tolist() == [3, 10] and restored.stops.tolist() == [9, 12]
    assert RowRanges.union([]).rows == 0 and not RowRanges.empty().contains([0]).any()


def test_sources_number_their_rows_in_input_order(ray_session, zh_rows, tmp_path):
    """Files: file index << 32 | place in the file (row groups included); datasets: the row's index."""
    import datasets
    import ray.data

    table = pa.Table.from_pylist([{"id": str(i), **row} for i, row in enumerate(zh_rows[:5])])
    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(table, folder / "a.parquet", row_group_size=2)  # 3 row groups
    pq.write_table(table.slice(0, 3), folder / "b.parquet")
    ds, _ = open_source(str(folder))
    rows = ds.take_all()
    got = sorted((row[SOURCE_ROW], row["id"]) for row in rows)
    expected = [(i, str(i)) for i in range(5)] + [((1 << FILE_SHIFT) + i, str(i)) for i in range(3)]
    assert got == expected

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(zh_rows[:7]).save_to_disk(str(saved))
    assert sorted(row[SOURCE_ROW] for row in open_source(str(saved))[0].take_all()) == list(range(7))

    in_memory = ray.data.from_items([{"n": i} for i in range(10)], override_num_blocks=3)
    numbered = open_source(in_memory)[0].take_all()
    assert [(row[SOURCE_ROW], row["n"]) for row in numbered] == [(i, i) for i in range(10)]


@pytest.fixture
def duplicate_rows(zh_rows) -> list[dict]:
    """Rows 0 and 2 share an id with different content; row 3 repeats row 1 exactly (short pairs)."""
    short = sorted(zh_rows, key=lambda row: len(json.dumps(row)))[:3]
    rows = [{"id": "a", **short[0]}, {"id": "b", **short[1]}, {"id": "a", **short[2]}]
    return [*rows, dict(rows[1])]


def test_duplicates_keep_the_first_row_in_input_order(
    ray_session, toy_model, duplicate_rows, tmp_path, monkeypatch
):
    """Each row in its own part file: the later copies (same content, or only the same id) are rejected
    with the reason, and the counts in the manifest are the rows on disk."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", duplicate_rows)
    output = tmp_path / "out"
    result = raydpo.precompute(model=str(toy_model), dataset=str(dataset), output=str(output), **SETTINGS)
    counts = result.train.counts
    assert (counts.read, counts.written, counts.rejected) == (4, 2, 2)
    assert counts.reject_reasons == {DUPLICATE_REASON: 2}
    data = raydpo.read_output(str(output)).read_table(["pair_id", "source_row"]).to_pylist()
    assert sorted((row["pair_id"], row["source_row"]) for row in data) == [("a", 0), ("b", 1)]
    rejects = pq.read_table(output / "train" / "rejects").to_pylist()
    assert sorted((row["source_row"], row["reason"]) for row in rejects) == [
        (2, DUPLICATE_REASON),
        (3, DUPLICATE_REASON),
    ]
    assert_manifest_counts_rows_on_disk(output / "train")
    assert_training_counts_finite_rows_from_footers(output / "train", monkeypatch)


def assert_training_counts_finite_rows_from_footers(split_dir, monkeypatch) -> None:
    """Each data file's footer counts its rows with a non-finite reference value; training's plan takes
    the counts from there without reading the values, and reads the values of a file written without."""
    from raydpo.train_stage import checks

    columns = checks.TOKEN_COLUMNS + list(cache.REFERENCE_COLUMNS)
    first = sorted((split_dir / cache.DATA_DIR).glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    values = table.column("ref_chosen_logps").to_numpy().copy()
    values[0] = np.nan
    poisoned = table.set_column(
        table.schema.get_field_index("ref_chosen_logps"), "ref_chosen_logps", pa.array(values, pa.float32())
    )
    key = pq.read_metadata(first).metadata[cache.KEY_METADATA].decode()
    pq.write_table(poisoned.replace_schema_metadata(part_metadata(poisoned, key)), first)  # as the sink does
    split = cache.open_split(str(split_dir))
    expected = {"rows": split.num_rows, "usable": split.num_rows - 1, "nonfinite_reference": 1}

    def unread(*args, **kwargs):
        raise AssertionError("the reference values were read")

    with monkeypatch.context() as patched:
        patched.setattr(checks.pq, "read_table", unread)
        assert checks.finite_rows(split, columns) == expected
    pq.write_table(poisoned.replace_schema_metadata(None), first)  # no raydpo footer: the values are read
    assert checks.finite_rows(cache.open_split(str(split_dir)), columns) == expected


def assert_manifest_counts_rows_on_disk(split) -> None:
    manifest = cache.read_manifest(str(split))
    on_disk = {
        directory: pq.read_table(split / directory, columns=["source_row"]).column("source_row").to_numpy()
        for directory in (cache.DATA_DIR, cache.REJECTS_DIR)
    }
    assert manifest.counts.written == len(on_disk[cache.DATA_DIR])
    assert manifest.counts.rejected == len(on_disk[cache.REJECTS_DIR])
    every = np.concatenate(list(on_disk.values()))
    assert sorted(every.tolist()) == list(range(manifest.counts.read))  # each input row exactly once
    listed = {entry.path: entry.rows for entry in manifest.files}
    assert listed == {
        f"{directory}/{name}": pq.read_metadata(split / directory / name).num_rows
        for directory in (cache.DATA_DIR, cache.REJECTS_DIR)
        for name in os.listdir(split / directory)
        if name.endswith(".parquet")
    }


def test_a_resume_keeps_the_first_row_even_if_a_later_copy_was_written_first(
    ray_session, toy_model, duplicate_rows, tmp_path
):
    """The state a crash can leave: the later copy of id "a" (row 2) is written, the first (row 0) is not.
    The resume skips the rows written (by range, not by id), scores row 0, and keeps it."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", duplicate_rows)
    output = tmp_path / "out"
    settings = {"model": str(toy_model), "dataset": str(dataset), "output": str(output), **SETTINGS}
    raydpo.precompute(settings)
    split = output / "train"
    finished = raydpo.read_output(str(output)).read_table().to_pylist()
    first = next(row for row in finished if row["pair_id"] == "a")

    # row 2 scored on its own, renumbered as row 2 of this input and keyed as this run's part file
    alone = raydpo.precompute(
        settings,
        dataset=str(write_jsonl(tmp_path / "alone.jsonl", [duplicate_rows[2]])),
        output=str(tmp_path / "alone"),
    )
    later = pq.read_table(tmp_path / "alone" / "train" / cache.DATA_DIR).replace_schema_metadata(None)
    later = later.set_column(
        later.schema.get_field_index("source_row"), "source_row", pa.array([2], pa.int64())
    )
    key = cache.read_manifest(str(split)).key
    assert alone.train.manifest.key != key
    for directory in (cache.DATA_DIR, cache.REJECTS_DIR):
        for part in (split / directory).glob("*.parquet"):
            if 0 in pq.read_table(part, columns=["source_row"]).column("source_row").to_pylist() or (
                2 in pq.read_table(part, columns=["source_row"]).column("source_row").to_pylist()
            ):
                part.unlink()
    fs, root = cache.resolve(str(split))
    cache.write_part(fs, f"{root}/{cache.DATA_DIR}", later, part_metadata(later, key))
    (split / cache.MANIFEST).unlink()
    (split / cache.PENDING).write_text(json.dumps({"key": key}))

    resumed = raydpo.precompute(settings)
    counts = resumed.train.counts
    assert (counts.read, counts.written, counts.rejected, counts.resumed) == (4, 2, 2, 3)
    data = {row["pair_id"]: row for row in raydpo.read_output(str(output)).read_table().to_pylist()}
    assert data["a"]["source_row"] == 0 and data["a"]["chosen_input_ids"] == first["chosen_input_ids"]
    assert data["a"]["ref_chosen_logps"] == pytest.approx(first["ref_chosen_logps"], rel=1e-5)
    rejects = pq.read_table(split / cache.REJECTS_DIR, columns=["source_row", "reason"]).to_pylist()
    assert {"source_row": 2, "reason": DUPLICATE_REASON} in rejects
    assert_manifest_counts_rows_on_disk(split)


def test_streaming_shuffle_visits_every_pair_once_in_a_seeded_order(ray_session):
    """`shuffle="files"`: blocks in a seeded order, then a seeded buffer in the worker."""
    import ray.data

    from raydpo.train_stage.forward import micro_batches

    def epoch(seed: int) -> list[int]:
        ds = ray.data.range(200, override_num_blocks=10).randomize_block_order(seed=seed)
        batches = micro_batches(ds.iterator(), 8, shuffle_buffer=32, seed=seed)
        return [int(i) for batch in batches for i in batch["id"]]

    first = epoch(7)
    assert sorted(first) == list(range(200))  # 200 = 25 full micro-batches: none dropped
    assert first == epoch(7)  # a restarted worker sees the same order
    assert first != sorted(first) and first != epoch(8)
