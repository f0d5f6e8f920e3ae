"""The precompute pipeline end to end on a real Ray instance, the real sample data and a tiny model."""

from __future__ import annotations

import copy
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from conftest import to_conversational, write_jsonl

import raydpo
from raydpo.cli import main as cli_main
from raydpo.errors import RaydpoError

BAD_ROWS = [
    {"prompt": "p", "chosen": "   ", "rejected": "b"},  # empty completion
    {
        "prompt": [{"role": "wizard", "content": "x"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    },  # unknown role
    {"prompt": "x " * 600, "chosen": "a", "rejected": "b"},  # prompt fills max_length
]


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, en_rows):
    """ShareGPT, conversational, standard and implicit-prompt rows plus bad rows, in one JSONL file."""
    rows = list(en_rows[:10])
    rows += [to_conversational(r) for r in en_rows[10:16]]
    rows += [
        {
            "prompt": r["conversations"][-1]["value"],
            "chosen": r["chosen"]["value"],
            "rejected": r["rejected"]["value"],
        }
        for r in en_rows[16:20]
    ]
    rows += [{"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."}]
    rows += BAD_ROWS
    # JSONL keeps one type per column only if rows agree, so store each row's JSON as text and let
    # the format detection see the parsed values: write two files instead (Arrow needs one schema per file)
    folder = tmp_path_factory.mktemp("mixed")
    write_jsonl(folder / "sharegpt.jsonl", rows[:10])
    write_jsonl(folder / "conversational.jsonl", rows[10:16] + [BAD_ROWS[1]])
    write_jsonl(folder / "standard.jsonl", rows[16:21] + [BAD_ROWS[0], BAD_ROWS[2]])
    return folder


@pytest.fixture(scope="module")
def execution_options_before(ray_session):
    """The process-wide Ray Data execution options as they were before this module's first precompute."""
    import ray.data

    return copy.deepcopy(ray.data.DataContext.get_current().execution_options)


@pytest.fixture(scope="module")
def first_run(ray_session, execution_options_before, toy_model, mixed_file, sample_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("cache") / "out"
    result = raydpo.precompute(
        model=str(toy_model),
        dataset=str(mixed_file),
        output=str(output),
        eval_dataset=str(sample_dir / "dpo_zh_demo.json"),
        limit=None,
        max_length=512,
        batch_size=3,
        sort_window=2,
    )
    return result, output


def test_row_count_invariant_and_rejects(first_run):
    result, output = first_run
    counts = result.train.counts
    assert counts.read == 10 + 7 + 7 == counts.written + counts.rejected
    rejects = pq.read_table(output / "train" / "rejects").to_pylist()
    reasons = " | ".join(r["reason"] for r in rejects)
    assert "empty chosen completion" in reasons and "unknown role" in reasons
    assert "prompt fills max_length" in reasons
    assert all(json.loads(r["row_json"]) for r in rejects)
    # the manifest counts each reason without the row's own figures; the summary names the commonest
    kinds = counts.reject_reasons
    assert sum(kinds.values()) == counts.rejected and "empty chosen completion" in kinds
    length = [r["reason"] for r in rejects if r["reason"].startswith("prompt fills max_length")]
    assert kinds["prompt fills max_length"] == len(length) and all("(" in reason for reason in length)
    reason, count = max(kinds.items(), key=lambda item: item[1])
    assert f"{counts.rejected} rejected ({count} {reason}; see rejects/)" in result.train.summary()
    data = pq.read_table(output / "train" / "data")
    assert data.num_rows == counts.written
    assert len(set(data.column("pair_id").to_pylist())) == data.num_rows
    assert result.eval.counts.read == 300


def test_values_equal_a_plain_transformers_forward(first_run, toy_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model, dtype=torch.float32).eval()
    rows = raydpo.read_output(str(first_run[1])).to_pandas().head(4).to_dict("records")
    with torch.inference_mode():
        for row in rows:
            prompt = list(row["prompt_input_ids"])
            for side in ("chosen", "rejected"):
                completion = list(row[f"{side}_input_ids"])
                ids = torch.tensor([prompt + completion])
                logps = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(prompt) - 1 : -1]
                expected = logps.gather(-1, torch.tensor(completion)[:, None]).sum().item()
                assert row[f"ref_{side}_logps"] == pytest.approx(expected, rel=1e-5)
                assert row[f"{side}_length"] == len(completion)
                assert row[f"ref_{side}_logps_shared"] + row[f"ref_{side}_logps_tail"] == pytest.approx(
                    row[f"ref_{side}_logps"], rel=1e-5
                )


def test_manifest_fingerprints_and_parquet_metadata(first_run):
    result, output = first_run
    manifest = json.loads((output / "train" / "manifest.json").read_text())
    assert manifest == result.train.manifest.to_dict()
    assert manifest["fingerprints"]["model"]["weights_sha256"]
    assert manifest["fingerprints"]["tokenizer"]["chat_template_sha256"]
    assert manifest["fingerprints"]["dataset"]["kind"] == "files"
    assert manifest["settings"]["max_length"] == 512
    assert manifest["throughput"]["tokens"] > 0 and manifest["throughput"]["tokens_per_s"] > 0
    common = pq.read_schema(output / "train" / "data" / "_common_metadata")
    assert json.loads(common.metadata[b"raydpo.manifest"])["key"] == manifest["key"]
    for entry in manifest["files"]:
        part = pq.ParquetFile(output / "train" / entry["path"])
        assert part.schema_arrow.metadata[b"raydpo.cache_key"].decode() == manifest["key"]
    assert not (output / "train" / "_pending.json").exists()


def test_process_wide_data_context_is_left_as_found(first_run, execution_options_before):
    """The pipeline keeps its blocks in order through a context of its own, not the process-wide one."""
    import ray.data

    assert ray.data.DataContext.get_current().execution_options == execution_options_before


def test_rerun_is_a_cached_no_op_and_changed_inputs_need_overwrite(
    first_run, toy_model, mixed_file, sample_dir
):
    _, output = first_run
    same = dict(
        model=str(toy_model),
        dataset=str(mixed_file),
        output=str(output),
        eval_dataset=str(sample_dir / "dpo_zh_demo.json"),
        max_length=512,
        batch_size=8,
    )
    again = raydpo.precompute(**same)  # batch size does not change values, so it is not part of the key
    assert again.train.cached and again.eval.cached
    with pytest.raises(RaydpoError, match="different inputs"):
        raydpo.precompute(**{**same, "max_length": 384})


def test_values_do_not_depend_on_batch_size_padding_actor_count_or_prefix_sharing(
    ray_session, toy_model, sample_dir, tmp_path
):
    source = str(sample_dir / "dpo_en_demo.json")
    common = dict(model=str(toy_model), dataset=source, limit=16, max_length=384)
    with pytest.raises(RaydpoError, match="take all 2 CPUs"):
        raydpo.precompute(**common, output=str(tmp_path / "a"), num_actors=2, cpus_per_actor=1)
    a = raydpo.precompute(
        **common,
        output=str(tmp_path / "a"),
        batch_size=3,  # shared rows of an SDPA model: the 3 pairs end to end in one row
        num_actors=2,
        cpus_per_actor=0.5,
        prefix_sharing="on",
    )
    b = raydpo.precompute(
        **common, output=str(tmp_path / "b"), batch_size=5, num_actors=1, sort_window=1, prefix_sharing="off"
    )
    frame_a = raydpo.read_output(a.output).to_pandas().set_index("pair_id").sort_index()
    frame_b = raydpo.read_output(b.output).to_pandas().set_index("pair_id").sort_index()
    assert list(frame_a.index) == list(frame_b.index)
    for column in (
        "ref_chosen_logps",
        "ref_rejected_logps",
        "ref_chosen_logps_shared",
        "ref_rejected_logps_tail",
    ):
        torch.testing.assert_close(
            torch.tensor(frame_a[column].values), torch.tensor(frame_b[column].values), rtol=1e-5, atol=1e-3
        )
    assert b.train.manifest.throughput.padding_fraction > 0  # unsorted batches of 5 pad
    # the same values: the same cache key, whichever layout computed them
    assert a.train.manifest.key == b.train.manifest.key
    shared, unshared = a.train.manifest.throughput, b.train.manifest.throughput
    prompt_tokens = int(frame_a["prompt_length"].sum())
    assert shared.prefix_sharing == "on" and shared.tokens_saved_by_prefix_sharing == prompt_tokens
    assert shared.tokens_computed == shared.tokens - prompt_tokens
    assert shared.padding_fraction == 0  # packed rows pad nothing
    assert unshared.prefix_sharing == "off" and unshared.tokens_saved_by_prefix_sharing == 0


def test_in_memory_ray_dataset_is_cached_by_content(ray_session, toy_model, en_rows, tmp_path):
    import ray.data

    rows = [to_conversational(r) for r in en_rows[:6]]
    output = str(tmp_path / "mem")
    dataset = ray.data.from_items(rows)
    preserve_order = dataset.context.execution_options.preserve_order
    first = raydpo.precompute(model=str(toy_model), output=output, max_length=512, dataset=dataset)
    second = raydpo.precompute(
        model=str(toy_model), output=output, max_length=512, dataset=ray.data.from_items(list(reversed(rows)))
    )
    assert not first.train.cached and second.train.cached
    assert first.train.manifest.fingerprints.dataset["kind"] == "ray_dataset"
    assert dataset.context.execution_options.preserve_order == preserve_order  # the caller's, as given


def test_cli_bad_input_exits_2_with_one_line(ray_session, toy_model, tmp_path, capsys, sample_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    assert (
        cli_main(
            ["precompute", "--model", str(toy_model), "--dataset", str(bad), "--output", str(tmp_path / "o")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs 'chosen' and 'rejected' columns" in err
    assert ray_session.is_initialized()  # an in-process command leaves the caller's Ray connection up
    assert (
        cli_main(
            [
                "precompute",
                "--model",
                str(tmp_path / "no-such-model"),
                "--dataset",
                str(sample_dir / "dpo_en_demo.json"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.endswith("no-such-model does not exist\n")  # checked before Ray starts
    assert (
        cli_main(
            [
                "precompute",
                "--model",
                str(toy_model),
                "--dataset",
                str(tmp_path / "missing.json"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "dataset not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a run that failed before writing leaves no directory behind


def test_cpu_threads_share_the_machine():
    """A CPU scorer or training worker runs the machine's cores shared among the processes beside it,
    never fewer than its Ray CPUs."""
    from raydpo.resources import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(1, 1) == cores
    assert cpu_threads(1, 2 * cores) == 1
    assert cpu_threads(0.5, 1) == cores
    assert cpu_threads(cores + 2, 1) == cores + 2


def test_scorer_pool_is_as_set_else_one_per_node_on_cpus_and_every_gpu(ray_session, toy_model):
    """Without num_actors, the pool is one actor per node with CPUs (one on this instance), or as many
    as the cluster's GPUs hold with gpus_per_actor: none here, which is one line naming the flag."""
    from raydpo.config import PrecomputeConfig
    from raydpo.precompute_stage.pipeline import _with_actors

    config, reason = _with_actors(PrecomputeConfig(model=str(toy_model)))
    assert config.num_actors == 1 and reason.startswith("one per node with CPUs (1)")
    assert _with_actors(PrecomputeConfig(model=str(toy_model), num_actors=3))[0].num_actors == 3
    with pytest.raises(
        RaydpoError, match="^gpus_per_actor: the Ray cluster has no GPUs now; set --num-actors"
    ):
        _with_actors(PrecomputeConfig(model=str(toy_model), gpus_per_actor=1))


@pytest.mark.parametrize("allocator", ["mimalloc", "system"])
def test_cpu_scorer_actors_allocate_with_cpu_allocator(ray_session, toy_model, allocator):
    """The scorer actor, started with the runtime env the pipeline gives it, runs with `cpu_allocator`
    (with glibc's malloc its heap grew with the pairs scored), and sees no GPU: Ray leaves
    CUDA_VISIBLE_DEVICES alone for num_gpus=0, so on a GPU node torch would score on cuda:0."""
    import ray

    from raydpo.config import PrecomputeConfig
    from raydpo.precompute_stage.pipeline import scorer_env
    from raydpo.precompute_stage.scorer import ReferenceScorer
    from raydpo.resources import CPU_ONLY_ENV

    config = PrecomputeConfig(model=str(toy_model), cpu_allocator=allocator)
    actor = (
        ray.remote(ReferenceScorer)
        .options(num_cpus=0, runtime_env=scorer_env(config))
        .remote(model=str(toy_model), cpu_allocator=allocator)
    )
    try:
        assert ray.get(actor.__ray_call__.remote(lambda scorer: scorer.cpu_allocator)) == allocator
        seen = ray.get(
            actor.__ray_call__.remote(
                lambda scorer: (str(scorer.device), {name: os.environ.get(name) for name in CPU_ONLY_ENV})
            )
        )
        assert seen == ("cpu", CPU_ONLY_ENV)
    finally:
        ray.kill(actor)


def test_weight_digest_is_chunked_sha256(tmp_path):
    """Weight files are hashed in chunks (Python 3.10 has no `hashlib.file_digest`), to the same digest."""
    import hashlib

    from raydpo.cache import file_sha256

    payload = bytes(range(256)) * 1000 + b"tail"
    (tmp_path / "w.bin").write_bytes(payload)
    assert file_sha256(tmp_path / "w.bin", chunk_bytes=4096) == hashlib.sha256(payload).hexdigest()


def test_weight_digests_are_computed_once_per_file(tmp_path, monkeypatch):
    """A weight file is hashed once and its digest reused while the file is unchanged; written in place
    (same size, new contents and times) or copied to a new path, it is hashed again; a hub snapshot's
    file, a link to a blob named by its SHA-256, is not read at all."""
    import hashlib
    import shutil

    from raydpo import digests

    monkeypatch.setenv(digests.DIGEST_CACHE_ENV, str(tmp_path / "digests"))
    hashed = []
    real = digests.file_sha256
    monkeypatch.setattr(digests, "file_sha256", lambda path: hashed.append(path) or real(path))
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 4096)
    first = digests.cached_sha256(weights)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest() and len(hashed) == 1
    assert digests.cached_sha256(weights) == first and len(hashed) == 1  # from the digest cache

    weights.write_bytes(b"b" * 4096)  # in place, same size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert digests.cached_sha256(weights) == hashlib.sha256(b"b" * 4096).hexdigest() and len(hashed) == 2
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy2(weights, copy)
    assert digests.cached_sha256(copy) == digests.cached_sha256(weights) and len(hashed) == 3

    blob = tmp_path / "hub" / "blobs" / hashlib.sha256(b"hub").hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"hub")
    linked = tmp_path / "hub" / "snapshots" / "abc" / "model.safetensors"
    linked.parent.mkdir(parents=True)
    linked.symlink_to(blob)
    assert digests.cached_sha256(linked) == blob.name and len(hashed) == 3
