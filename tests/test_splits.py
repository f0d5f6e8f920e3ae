"""Data as users name it: a Hugging Face dataset's config, revision, data files and split (only that split
read), an eval split carved from the training data, and the warning when train and eval share pairs."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import to_conversational, write_jsonl

import raydpo
from raydpo.cli import main as cli_main
from raydpo.config import PrecomputeConfig
from raydpo.data import canonical_pair
from raydpo.errors import RaydpoError
from raydpo.hf_data import HfOptions, find_split
from raydpo.precompute_stage import pipeline
from raydpo.precompute_stage.splits import EvalCarve, id_hashes, plan_splits
from raydpo.sources import find_files, open_source

NOT_DATA = b"not a data file: reading it fails"


@pytest.fixture(scope="module")
def rows(en_rows):
    return [to_conversational(r) for r in en_rows[30:54]]


@pytest.fixture(scope="module")
def layouts(rows, tmp_path_factory):
    """Three local layouts whose `test` split is a corrupt file that no reader may touch: Parquet files
    named by split as the hub lays them out, a repository whose card lists two configs, and a
    `save_to_disk` DatasetDict."""
    import datasets

    root = tmp_path_factory.mktemp("layouts")
    (root / "parquet" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:8]), root / "parquet/data/train-00000-of-00001.parquet")
    (root / "parquet/data/test-00000-of-00001.parquet").write_bytes(NOT_DATA)
    card = "---\nconfigs:\n"
    for config, part in (("first", rows[:8]), ("second", rows[8:14])):
        (root / "configs" / config).mkdir(parents=True)
        write_jsonl(root / "configs" / config / "train.jsonl", part)
        (root / "configs" / config / "test.jsonl").write_bytes(NOT_DATA)
        card += f"- config_name: {config}\n  data_files:\n"
        card += f"  - split: train\n    path: {config}/train.jsonl\n  - split: test\n    path: {config}/test.jsonl\n"
    (root / "configs" / "README.md").write_text(card + "---\n# prefs\n")
    saved = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows[:8]), test=datasets.Dataset.from_list(rows[8:10])
    )
    saved.save_to_disk(str(root / "saved"))
    for arrow in (root / "saved" / "test").glob("*.arrow"):
        arrow.write_bytes(NOT_DATA)
    return root


def prompts(dataset) -> list:
    return [row["prompt"] for row in dataset]


def test_only_the_named_split_is_read(layouts, rows):
    """Each layout is for `datasets` (not raydpo's file reader, which would read every split); its train
    split loads while its test split's file is corrupt; a config and data files choose what is read."""
    for name in ("parquet", "configs", "saved"):
        assert find_files(str(layouts / name)) is None, name
    assert prompts(find_split(str(layouts / "parquet"), "train").load()) == prompts(rows[:8])
    assert prompts(find_split(str(layouts / "saved"), "train").load()) == prompts(rows[:8])
    second = find_split(str(layouts / "configs"), "train", HfOptions(config="second")).load()
    assert prompts(second) == prompts(rows[8:14])
    chosen = HfOptions(
        config="first", data_files={"train": "second/train.jsonl", "test": "second/test.jsonl"}
    )
    assert prompts(find_split(str(layouts / "configs"), "train", chosen).load()) == prompts(rows[8:14])
    with pytest.raises(RaydpoError, match="saved with save_to_disk: it has no config"):
        find_split(str(layouts / "saved"), "train", HfOptions(revision="main"))
    with pytest.raises(RaydpoError, match=r"could not open dataset .*\['first', 'second'\]"):
        find_split(str(layouts / "configs"), "train")  # two configs and none named


def test_data_files_from_a_flag_and_from_yaml(toy_model, tmp_path):
    from raydpo.cli import _config, build_parser

    spec = tmp_path / "c.yaml"
    spec.write_text(
        "precompute:\n  data_files:\n    train: data/train-*.parquet\n    test: [data/t.parquet]\n"
    )
    args = build_parser().parse_args(["precompute", "--config", str(spec), "--model", str(toy_model)])
    mapping = {"train": "data/train-*.parquet", "test": ["data/t.parquet"]}
    assert _config(PrecomputeConfig, args, "precompute").data_files == mapping
    flags = ["--data-files", "a.jsonl,b.jsonl", "--dataset-config", "en", "--eval-split-count", "7"]
    args = build_parser().parse_args(["precompute", "--model", str(toy_model), *flags])
    config = _config(PrecomputeConfig, args, "precompute")
    assert (config.data_files, config.dataset_config, config.eval_split_count) == (
        ["a.jsonl", "b.jsonl"],
        "en",
        7,
    )


def test_eval_split_alone_is_another_split_of_the_dataset(layouts, rows, toy_model, tmp_path):
    """`eval_split` without `eval_dataset`: that split of `dataset`, with its config; data files have no
    splits, so there it is refused rather than evaluating on the training rows."""
    config = PrecomputeConfig(
        model=str(toy_model), dataset=str(layouts / "configs"), dataset_config="first", eval_split="test"
    )
    plan = plan_splits(config)
    assert (plan["train"].found.split, plan["eval"].found.split) == ("train", "test")
    assert (
        list(plan["eval"].found.options.data_files) == ["test"]
        and plan["eval"].found.options.config == "first"
    )
    data = str(write_jsonl(tmp_path / "r.jsonl", rows))
    with pytest.raises(RaydpoError, match="eval_split 'test' names a split of a Hugging Face dataset"):
        plan_splits(PrecomputeConfig(model=str(toy_model), dataset=data, eval_split="test"))
    with pytest.raises(RaydpoError, match="dataset_revision names a revision of a hub dataset"):
        plan_splits(
            PrecomputeConfig(model=str(toy_model), dataset=str(layouts / "parquet"), dataset_revision="v1")
        )


@pytest.mark.parametrize(
    ("layout", "options", "shown"),
    [
        ("parquet", [], "has no split 'validation' (has: train, test)"),
        ("saved", [], "has no split 'validation' (has: train, test)"),
        (
            "configs",
            ["--dataset-config", "first"],
            "(config 'first') has no split 'validation' (has: train, test)",
        ),
    ],
)
def test_a_split_that_does_not_exist_is_one_line_before_ray(
    layout, options, shown, layouts, toy_model, tmp_path, capsys, monkeypatch
):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline, "init_ray", no_ray)
    command = ["precompute", "--model", str(toy_model), "--dataset", str(layouts / layout), *options]
    assert cli_main([*command, "--split", "validation", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shown in err, err
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_config_and_split_end_to_end(ray_session, toy_model, layouts, rows, tmp_path):
    """`precompute` reads the named config's train split (its test file is corrupt and left unread)."""
    result = raydpo.precompute(
        model=str(toy_model),
        dataset=str(layouts / "configs"),
        dataset_config="second",
        output=str(tmp_path / "out"),
        max_length=512,
    )
    assert result.train.counts.read == 6 and result.eval is None
    assert result.train.manifest.fingerprints.dataset["kind"] == "huggingface"


def test_conflicting_eval_settings_are_refused_with_one_line(toy_model, rows, tmp_path):
    model = str(toy_model)
    for extra in ({"eval_dataset": "e.jsonl"}, {"eval_split": "test"}, {"eval_split_count": 3}):
        with pytest.raises(RaydpoError, match="exclude each other") as refused:
            PrecomputeConfig(model=model, eval_split_ratio=0.2, **extra)
        assert "\n" not in str(refused.value)
    for ratio in (0, 1, 1.5):
        with pytest.raises(RaydpoError, match="eval_split_ratio must be between 0 and 1"):
            PrecomputeConfig(model=model, eval_split_ratio=ratio)
    data = str(write_jsonl(tmp_path / "r.jsonl", rows))
    config = PrecomputeConfig(model=model, dataset=data, eval_split_count=3)
    with pytest.raises(RaydpoError, match="exclude each other"):
        plan_splits(config, eval_dataset=object())  # the Python API's eval_dataset=


def carve(toy_model, data, output, **settings):
    result = raydpo.precompute(
        model=str(toy_model), dataset=data, output=str(output), max_length=512, **settings
    )
    ids = {
        name: set(raydpo.read_output(result.output, split=name).to_pandas(["pair_id"])["pair_id"])
        for name in ("train", "eval")
    }
    return result, ids


def carved(toy_model, data, carve, side):
    """The rows that SIDE of CARVE keeps, as the precompute's tokenizing tasks pass them on (no scoring)."""
    config = PrecomputeConfig(model=str(toy_model), max_length=512)
    source, _ = open_source(data)

    def prepared(keep=None):
        return pipeline._prepared(source, config, "toy", None, None, keep)

    return prepared(carve.filter(side, prepared)).to_pandas()


def test_eval_split_count_is_exact_disjoint_and_stable(ray_session, toy_model, rows, tmp_path):
    """Also on the input reversed: membership goes by each pair id's seeded hash, not its position."""
    data = str(write_jsonl(tmp_path / "r.jsonl", rows))
    result = raydpo.precompute(
        model=str(toy_model), dataset=data, output=str(tmp_path / "a"), max_length=512, eval_split_count=5
    )
    ids = {
        name: set(raydpo.read_output(result.output, split=name).to_pandas(["pair_id"])["pair_id"])
        for name in ("train", "eval")
    }
    assert len(ids["eval"]) == result.eval.counts.written == 5
    assert len(ids["train"]) == result.train.counts.written > 0 and not ids["train"] & ids["eval"]
    assert result.train.counts.read + result.eval.counts.read == len(rows)  # every row, on one side
    assert id_hashes(sorted(ids["eval"]), 0).max() < id_hashes(sorted(ids["train"]), 0).min()
    reversed_data = str(write_jsonl(tmp_path / "s.jsonl", list(reversed(rows))))
    again = EvalCarve(None, 5, 0)
    for side in ("eval", "train"):
        frame = carved(toy_model, reversed_data, again, side)
        assert set(frame[frame.status == "ok"].pair_id) == ids[side]


def test_eval_split_ratio_follows_the_hash(ray_session, toy_model, rows, tmp_path):
    """Each pair is on the eval side iff its seeded hash is below ratio * 2**64, so the share is as close
    to the ratio as the hashes fall; another seed draws another split."""
    data = str(write_jsonl(tmp_path / "r.jsonl", rows))
    sides = {side: carved(toy_model, data, EvalCarve(0.25, None, 7), side) for side in ("eval", "train")}
    assert len(sides["eval"]) + len(sides["train"]) == len(rows)  # every row, once
    assert not set(sides["eval"].pair_id) & set(sides["train"].pair_id)
    for side, frame in sides.items():
        in_eval = id_hashes(list(frame.pair_id), 7) < int(0.25 * 2**64)
        assert in_eval.tolist() == [side == "eval"] * len(frame), side
    assert 0 < len(sides["eval"]) < len(rows) / 2
    other = carved(toy_model, data, EvalCarve(0.25, None, 8), "eval")
    assert set(other.pair_id) != set(sides["eval"].pair_id)


def test_an_eval_file_that_overlaps_the_training_data_is_warned_about(
    ray_session, toy_model, rows, tmp_path, caplog
):
    train = str(write_jsonl(tmp_path / "train.jsonl", rows[:8]))
    evaluated = str(write_jsonl(tmp_path / "eval.jsonl", rows[5:11]))
    with caplog.at_level(logging.WARNING, logger="raydpo.precompute_stage.splits"):
        result = raydpo.precompute(
            model=str(toy_model),
            dataset=train,
            eval_dataset=evaluated,
            output=str(tmp_path / "o"),
            max_length=512,
        )
    written = [
        set(raydpo.read_output(result.output, split=name).to_pandas(["pair_id"]).pair_id)
        for name in ("train", "eval")
    ]
    shared = written[0] & written[1]  # the rows both files hold, less those rejected (too long)
    assert len(shared) > 1 and shared <= {canonical_pair(row).pair_id for row in rows[5:8]}
    warned = [r.getMessage() for r in caplog.records if r.name == "raydpo.precompute_stage.splits"]
    assert len(warned) == 1 and warned[0].startswith(
        f"{len(shared)} pairs of the eval split are also in the train"
    )
