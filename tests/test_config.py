"""Config validation, YAML loading and dotted overrides."""

from __future__ import annotations

import pytest

from raydpo.config import PrecomputeConfig, TrainConfig, apply_overrides, from_mapping, load_yaml
from raydpo.errors import RaydpoError


def test_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("precompute:\n  model: m\n  batch-size: 4\n")
    values = apply_overrides(load_yaml(path), ["precompute.batch_size=16", "precompute.max_length=null"])
    config = from_mapping(PrecomputeConfig, values["precompute"])
    assert (config.batch_size, config.max_length) == (16, None)


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (PrecomputeConfig, {"model": "m", "batch_size": 0}, "batch_size must be a positive integer"),
        (PrecomputeConfig, {"model": "m", "truncation_mode": "keep_end"}, "keep_end"),
        (PrecomputeConfig, {"model": "m", "dtype": "int8"}, "dtype must be one of"),
        (PrecomputeConfig, {"model": "m", "max_length": 64, "max_prompt_length": 64}, "max_prompt_length"),
        (PrecomputeConfig, {"model": "m", "colour": 1}, "unknown PrecomputeConfig setting"),
        (PrecomputeConfig, {}, "PrecomputeConfig: model is required"),
        (PrecomputeConfig, {"model": "m", "gpus_per_actor": 2}, "gpus_per_actor 2: a scorer actor runs"),
        (TrainConfig, {"model": "m", "dtype": "fp8"}, "dtype must be one of"),
        (TrainConfig, {"model": "m", "beta": 0}, "beta must be > 0, got 0"),
        (TrainConfig, {"model": "m", "loss_type": "dpo++"}, "loss type"),
        (TrainConfig, {"model": "m", "label_smoothing": 0.7, "loss_type": "robust"}, "label_smoothing"),
        (TrainConfig, {"model": "m", "sync_ref_model": True}, "reference is fixed"),
        (TrainConfig, {"model": "m", "zero_stage": 4}, "zero_stage"),
        (
            TrainConfig,
            {"model": "m", "zero_stage": 0, "offload_optimizer": True},
            "needs zero_stage 1, 2 or 3",
        ),
        (
            TrainConfig,
            {"model": "m", "cpu_allocator": "jemalloc"},
            "cpu_allocator must be mimalloc or system",
        ),
        (TrainConfig, {"model": "m", "lora_alpha": "abc"}, "lora_alpha must be a number, got 'abc'"),
        (TrainConfig, {"model": "m", "use_gpu": "maybe"}, "use_gpu must be true or false, got 'maybe'"),
        (TrainConfig, {"model": "m", "micro_batch_size": 2.5}, "micro_batch_size must be an integer"),
        (PrecomputeConfig, {"model": "m", "max_actor_restarts": "x"}, "max_actor_restarts must be an int"),
        (TrainConfig, {"model": "m", "weight_decay": -1}, "weight_decay and gradient_clipping must be >= 0"),
        (TrainConfig, {"model": "m", "lora_dropout": 2}, "lora_dropout in \\[0, 1\\)"),
    ],
)
def test_invalid_settings_are_one_clear_error(cls, values, message):
    with pytest.raises(RaydpoError, match=message):
        from_mapping(cls, values)


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    """YAML 1.1 reads `5e-7` (no dot) as a string; a number setting takes it as the number it writes."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  model: m\n  learning_rate: 5e-7\n  max_steps: 1e3\n")
    values = apply_overrides(load_yaml(path), ["train.warmup_ratio=1e-1", "train.cpus_per_worker=2"])
    config = from_mapping(TrainConfig, values["train"])
    assert (config.learning_rate, config.max_steps, config.warmup_ratio) == (5e-7, 1000, 0.1)
    assert config.cpus_per_worker == 2.0 and isinstance(config.cpus_per_worker, float)


def test_bad_override_and_yaml(tmp_path):
    with pytest.raises(RaydpoError, match="key=value"):
        apply_overrides({}, ["beta"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(RaydpoError, match="not valid YAML"):
        load_yaml(bad)


def test_train_yaml_mirrors_the_flags(tmp_path):
    from raydpo.cli import _config, build_parser

    path = tmp_path / "run.yaml"
    path.write_text(
        "train:\n  model: m\n  loss-type: [sigmoid, sft]\n  loss_weights: [1.0, 0.5]\n  lora-r: 8\n"
        "  lora-target-modules: [q_proj, v_proj]\n"
    )
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--beta", "0.05", "--set", "train.grad_accum=4"]
    )
    config = _config(TrainConfig, args, "train")
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5]
    assert (config.beta, config.grad_accum, config.lora_r) == (0.05, 4, 8)
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    flags = build_parser().parse_args(
        ["train", "--model", "m", "--loss-type", "sigmoid,bco_pair", "--loss-weights", "0.8,0.2"]
    )
    config = _config(TrainConfig, flags, "train")
    assert config.loss_type == ["sigmoid", "bco_pair"] and config.loss_weights == [0.8, 0.2]

    job = tmp_path / "job.yaml"  # a job config: train defaults to its precompute's model and output
    job.write_text("precompute:\n  model: m\n  output: c\n  trust-remote-code: true\ntrain:\n  beta: 0.2\n")
    config = _config(TrainConfig, build_parser().parse_args(["train", "--config", str(job)]), "train")
    assert (config.model, config.data, config.trust_remote_code, config.beta) == ("m", "c", True, 0.2)
    args = build_parser().parse_args(["train", "--config", str(job), "--model", "n", "--data", "d"])
    assert (_config(TrainConfig, args, "train").model, _config(TrainConfig, args, "train").data) == ("n", "d")


@pytest.fixture()
def model_dir(tmp_path):
    """A model directory with only a config (hidden size 64): all the DeepSpeed config reads."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_deepspeed_config_built_and_user_file(tmp_path, model_dir):
    from raydpo.train_stage.ds_config import for_run

    config = TrainConfig(
        model=model_dir, micro_batch_size=4, grad_accum=2, offload_optimizer=True, gradient_clipping=0.5
    )
    built = for_run(config, world_size=3, total_steps=10)
    assert built["train_batch_size"] == 24 and built["gradient_clipping"] == 0.5
    assert built["zero_optimization"]["stage"] == 3
    assert built["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert built["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert built["bf16"]["enabled"] is False  # CPU, dtype auto: fp32
    assert for_run(TrainConfig(model=model_dir, dtype="bfloat16"), 2, 10)["bf16"]["enabled"] is True
    # one worker has nothing to partition: it runs stage 0, unless it offloads, which needs ZeRO
    assert for_run(TrainConfig(model=model_dir), 1, 10)["zero_optimization"] == {"stage": 0}
    assert for_run(TrainConfig(model=model_dir), 2, 10)["zero_optimization"]["stage"] == 3
    assert for_run(config, 1, 10)["zero_optimization"]["stage"] == 3
    # in bf16, stage 0 (one worker's, or one set) runs DeepSpeed's bf16 optimizer: stage 1, fp32 sums
    bf16 = {"model": model_dir, "dtype": "bfloat16"}
    for settings, workers in (({}, 1), ({"zero_stage": 0}, 2)):
        built = for_run(TrainConfig(**bf16, **settings), workers, 10)
        assert built["zero_optimization"] == {"stage": 1}, settings
        assert built["data_types"] == {"grad_accum_dtype": "fp32"}
    for settings in ({"zero_stage": 1}, {"zero_stage": 2}, {}):  # ZeRO's own optimizers, as set
        built = for_run(TrainConfig(**bf16, **settings), 2, 10)
        assert built["zero_optimization"]["stage"] == settings.get("zero_stage", 3)
        assert "data_types" not in built
    assert "data_types" not in for_run(TrainConfig(model=model_dir, zero_stage=0), 2, 10)  # fp32
    # in fp16 too, stage 0 runs ZeRO-1's fused fp16 optimizer, not DeepSpeed's unfused stage-0 wrapper
    fp16 = {"model": model_dir, "dtype": "float16", "use_gpu": True}
    for settings, workers in (({}, 1), ({"zero_stage": 0}, 2)):
        built = for_run(TrainConfig(**fp16, **settings), workers, 10)
        assert built["zero_optimization"] == {"stage": 1} and built["fp16"] == {"enabled": True}, settings
        assert "data_types" not in built  # ZeRO-1 sums fp16 gradients into its fp32 partition itself

    user = tmp_path / "ds.json"
    user.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}')
    loaded = for_run(TrainConfig(model=model_dir, deepspeed_config=str(user), micro_batch_size=4), 2, 10)
    assert loaded["zero_optimization"] == {"stage": 2} and loaded["train_batch_size"] == 8
    user.write_text('{"train_micro_batch_size_per_gpu": 16}')
    with pytest.raises(RaydpoError, match="train_micro_batch_size_per_gpu=16"):
        for_run(TrainConfig(model=model_dir, deepspeed_config=str(user), micro_batch_size=4), 2, 10)
    user.write_text("{not json")
    with pytest.raises(RaydpoError, match="cannot read the DeepSpeed config"):
        for_run(TrainConfig(model=model_dir, deepspeed_config=str(user)), 2, 10)


def test_deepspeed_auto_values_resolved_as_hugging_face_does(tmp_path, model_dir):
    """Every "auto" the Trainer integration fills is filled with the run's value; explicit values that
    contradict the run, and any other "auto", are refused naming the key."""
    import json

    from raydpo.train_stage.ds_config import for_run

    auto = "auto"
    user = {
        "gradient_clipping": auto,
        "bf16": {"enabled": auto},
        "optimizer": {"type": "AdamW", "params": dict.fromkeys(["lr", "betas", "eps", "weight_decay"], auto)},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": dict.fromkeys(
                ["warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"], auto
            ),
        },
        "zero_optimization": {
            "stage": 3,
            **dict.fromkeys(
                ["reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"],
                auto,
            ),
        },
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    config = TrainConfig(
        model=model_dir,
        deepspeed_config=str(path),
        dtype="bfloat16",
        learning_rate=3e-6,
        weight_decay=0.01,
        warmup_ratio=0.1,
        gradient_clipping=0.7,
    )
    resolved = for_run(config, world_size=2, total_steps=50)
    assert resolved["gradient_clipping"] == 0.7 and resolved["bf16"] == {"enabled": True}
    assert resolved["fp16"] == {"enabled": False} and resolved["train_batch_size"] == 16
    assert resolved["optimizer"]["params"] == {
        "lr": 3e-6,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.01,
    }
    assert resolved["scheduler"]["params"] == {
        "warmup_min_lr": 0,
        "warmup_max_lr": 3e-6,
        "warmup_num_steps": 5,
        "total_num_steps": 50,
    }
    zero = resolved["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (4096, int(0.9 * 4096))
    assert zero["stage3_param_persistence_threshold"] == 640

    user["optimizer"]["params"]["lr"] = 1e-5
    path.write_text(json.dumps(user))
    with pytest.raises(RaydpoError, match=r"optimizer.params.lr=1e-05 but the run's settings give 3e-06"):
        for_run(config, world_size=2, total_steps=50)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": auto}}))
    with pytest.raises(RaydpoError, match='zero_optimization.sub_group_size is "auto"'):
        for_run(config, world_size=2, total_steps=50)


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_cli_missing_required_setting_names_the_flag(command, capsys):
    from raydpo.cli import main

    assert main([command, "--beta" if command == "train" else "--batch-size", "2"]) == 2
    assert capsys.readouterr().err == f"raydpo {command}: error: --model is required\n"


def test_cli_version_defaults_and_misspelled_flags(capsys):
    """`--version` answers; `--help` shows each flag's default; a misspelled flag is answered by its
    subcommand (its usage, exit 2) with the closest flag."""
    from raydpo import __version__
    from raydpo.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"raydpo {__version__}\n"
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "(default: 0.1)" in shown and "(required)" in shown
    with pytest.raises(SystemExit) as done:
        main(["precompute", "--modle", "m"])
    error = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and error[0].startswith("usage: raydpo precompute")
    assert error[-1] == "raydpo precompute: error: unrecognized arguments: --modle m (did you mean --model?)"


def test_readme_configuration_reference_is_generated_from_the_dataclasses():
    from pathlib import Path

    from raydpo.cli import REFERENCE_END, REFERENCE_START, config_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(REFERENCE_START) + len(REFERENCE_START) : readme.index(REFERENCE_END)]
    assert section == config_reference(), "run: python -m raydpo.cli --write-config-reference README.md"


def test_import_has_no_side_effects():
    """`import raydpo` in a notebook loads no Ray, torch or transformers and parses no arguments."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['x', '--bogus']; import raydpo; "
        "heavy = [m for m in ('ray', 'torch', 'transformers', 'deepspeed', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(raydpo.run) and raydpo.TrainConfig(model='m').beta == 0.1"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_model_paths_are_checked_before_ray_starts(tmp_path):
    """A directory without config.json is not a model; a value written as a path must exist; a hub id
    passes unchecked (it is resolved when a stage runs)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaydpoError, match=r"model .*/empty has no config.json: not a saved model"):
        PrecomputeConfig(model=str(tmp_path / "empty"))
    with pytest.raises(RaydpoError, match=r"^model ./no-such-model does not exist$"):
        TrainConfig(model="./no-such-model", data="cache")
    with pytest.raises(RaydpoError, match=r"^tokenizer /no/such/tokenizer does not exist$"):
        PrecomputeConfig(model="org/name", tokenizer="/no/such/tokenizer")
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert TrainConfig(model=str(tmp_path / "empty"), data="cache").model == str(tmp_path / "empty")
    assert PrecomputeConfig(model="Qwen/Qwen2-0.5B").model == "Qwen/Qwen2-0.5B"
