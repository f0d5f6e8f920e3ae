"""Every kind of source, the optional per-token output, resume after a crash, and fatal bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import to_conversational, write_jsonl

import raydpo
from raydpo.errors import RaydpoError

MAX_LENGTH = 512


def run(toy_model, dataset, output, **kwargs):
    return raydpo.precompute(
        model=str(toy_model), dataset=dataset, output=str(output), max_length=MAX_LENGTH, **kwargs
    )


@pytest.fixture(scope="module")
def rows(en_rows):
    return [to_conversational(r) for r in en_rows[20:28]]


@pytest.fixture(scope="module")
def reference(ray_session, toy_model, rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    result = run(toy_model, str(write_jsonl(folder / "rows.jsonl", rows)), folder / "out")
    return raydpo.read_output(result.output).to_pandas().set_index("pair_id").sort_index()


def same_values(result, reference):
    frame = raydpo.read_output(result.output).to_pandas().set_index("pair_id").sort_index()
    assert list(frame.index) == list(reference.index)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert frame[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-5)


def test_relative_paths_and_hub_names_are_told_apart(tmp_path, monkeypatch):
    from raydpo.sources import _list_files

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "r.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    monkeypatch.chdir(tmp_path)
    for relative in ("data/r.jsonl", "./data/r.jsonl", "data"):
        files, _ = _list_files(relative)
        assert [info.path for info in files] == [str(tmp_path / "data" / "r.jsonl")], relative
    assert _list_files("org/prefs-2.5-data") == (None, None)  # a name for datasets.load_dataset
    with pytest.raises(RaydpoError, match="dataset not found: nope.json"):
        _list_files("nope.json")


def test_a_folder_with_data_files_not_read_is_refused(tmp_path):
    from raydpo.sources import open_source

    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    (tmp_path / "b.jsonl.gz").write_bytes(b"")
    (tmp_path / "NOTES.txt").write_text("not data")
    with pytest.raises(RaydpoError, match=r"also holds data files raydpo does not read \(b.jsonl.gz\)"):
        open_source(str(tmp_path))


def test_parquet_folder_and_file_uri(toy_model, rows, reference, tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), folder / "b.parquet")
    same_values(run(toy_model, f"file://{folder}", tmp_path / "out"), reference)


def test_huggingface_saved_to_disk_and_load_dataset(toy_model, rows, reference, tmp_path):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    same_values(run(toy_model, str(tmp_path / "saved"), tmp_path / "out1"), reference)
    # A cloned hub dataset repository (a dataset card with `configs`) goes to `datasets.load_dataset`.
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", rows)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train.jsonl\n---\n# prefs\n"
    )
    result = run(toy_model, str(repo), tmp_path / "out2")
    assert result.train.manifest.fingerprints.dataset["kind"] == "huggingface"
    same_values(result, reference)


def test_store_token_logps(toy_model, rows, reference, tmp_path, monkeypatch):
    """Also: a dataset path relative to the working directory, as the README writes them."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "r.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    result = run(toy_model, "data/r.jsonl", tmp_path / "out", store_token_logps=True)
    same_values(result, reference)
    frame = raydpo.read_output(result.output).to_pandas()
    for _, row in frame.iterrows():
        for side in ("chosen", "rejected"):
            tokens = row[f"ref_{side}_token_logps"]
            assert len(tokens) == row[f"{side}_length"]
            assert sum(tokens) == pytest.approx(row[f"ref_{side}_logps"], rel=1e-4)


def test_rerun_after_a_crash_resumes_and_matches(toy_model, en_rows, tmp_path, reliability):
    data = str(write_jsonl(tmp_path / "r.jsonl", [to_conversational(r) for r in en_rows[:12]]))
    clean = run(toy_model, data, tmp_path / "clean", batch_size=2, sort_window=1)
    expected = raydpo.read_output(clean.output).to_pandas().set_index("pair_id").sort_index()

    crashed = tmp_path / "crashed"
    run(toy_model, data, crashed, batch_size=2, sort_window=1)
    split = crashed / "train"
    manifest = json.loads((split / "manifest.json").read_text())
    (split / "manifest.json").rename(
        split / "_pending.json"
    )  # as a run killed before its last step leaves it
    (split / "_pending.json").write_text(json.dumps({"key": manifest["key"]}))
    parts = sorted((split / "data").glob("part-*.parquet"))
    lost = pq.read_table(parts[0]).num_rows
    parts[0].unlink()
    (split / "data" / ".part-x.parquet.tmp").write_bytes(b"torn")  # a half-written temporary file
    with pytest.raises(RaydpoError, match="unfinished"):
        raydpo.read_output(str(crashed))

    resumed = run(toy_model, data, crashed, batch_size=2, sort_window=1)
    assert resumed.train.counts.resumed == 12 - lost
    assert resumed.train.counts.read == clean.train.counts.read
    frame = raydpo.read_output(resumed.output).to_pandas().set_index("pair_id").sort_index()
    assert list(frame.index) == list(expected.index)
    assert frame["ref_chosen_logps"].tolist() == pytest.approx(
        expected["ref_chosen_logps"].tolist(), rel=1e-5
    )
    reliability.record(
        "precompute-3-torn-output",
        "precompute",
        "a crash leaves a torn output: no manifest, a part file missing, a half-written temporary file",
        "a finished output's manifest turned back into the pending marker, its first part file deleted, a "
        "torn `.tmp` file added",
        f"`read_output` refuses it as unfinished; the rerun kept {12 - lost} pairs, recomputed {lost}; same "
        "pair ids and values (rel 1e-5) as a clean run",
    )


def test_truncated_part_file_is_not_a_valid_cache(toy_model, rows, tmp_path, reliability):
    result = run(toy_model, str(write_jsonl(tmp_path / "r.jsonl", rows)), tmp_path / "out")
    part = next((tmp_path / "out" / "train" / "data").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(RaydpoError, match="missing or corrupt") as refused:
        raydpo.read_output(result.output)
    assert "\n" not in str(refused.value)
    reliability.record(
        "precompute-4-truncated-file",
        "precompute",
        "a truncated Parquet file in a finished output",
        "a part file cut to its first 100 bytes after the run",
        "reading the cache (and so training) stops with one line naming the file as missing or corrupt",
    )


def test_no_usable_rows_and_missing_chat_template_stop(toy_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": " ", "rejected": "x"}] * 3)
    with pytest.raises(RaydpoError, match="no usable rows"):
        run(toy_model, str(bad), tmp_path / "out")
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()

    plain = tmp_path / "plain-model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_model)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    AutoModelForCausalLM.from_pretrained(toy_model).save_pretrained(plain)
    conv = write_jsonl(
        tmp_path / "conv.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ],
    )
    with pytest.raises(RaydpoError, match="no chat template"):
        raydpo.precompute(model=str(plain), dataset=str(conv), output=str(tmp_path / "o2"))


def test_second_run_into_a_locked_output_stops(toy_model, rows, tmp_path, reliability):
    import os
    import subprocess

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / ".lock").write_text(
            json.dumps({"host": os.uname().nodename, "pid": sleeper.pid, "started": "now"})
        )
        with pytest.raises(RaydpoError, match=f"in use by another run \\(pid {sleeper.pid}"):
            run(toy_model, str(write_jsonl(tmp_path / "r.jsonl", rows)), tmp_path / "out")
    finally:
        sleeper.kill()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]  # nothing interleaved
    reliability.record(
        "precompute-5-concurrent-run",
        "precompute",
        "a second run into an output directory in use",
        "a lock file naming a live process (host, pid) in the output directory",
        "the second run stops with one line naming the owner's pid; it wrote nothing",
    )
