"""Shared fixtures: one Ray instance per session, a tiny local model, the real sample data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from raydpo.toy import build_toy_model, sample_data_dir  # noqa: E402

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return sample_data_dir()


@pytest.fixture(scope="session")
def en_rows(sample_dir) -> list[dict]:
    return json.loads((sample_dir / "dpo_en_demo.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def zh_rows(sample_dir) -> list[dict]:
    return json.loads((sample_dir / "dpo_zh_demo.json").read_text(encoding="utf-8"))


def to_conversational(row: dict) -> dict:
    """ShareGPT sample row -> TRL's conversational format (as the data's SOURCE.md describes)."""
    return {
        "prompt": [{"role": ROLE[turn["from"]], "content": turn["value"]} for turn in row["conversations"]],
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with a BPE tokenizer trained on the sample data (ChatML template)."""
    return build_toy_model(tmp_path_factory.mktemp("models") / "toy", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def tokenizer(toy_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_model)


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session."""
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Ray Data sets up its log handler on its first execution; doing that here, under pytest's
    # session-long capture, keeps it from binding to a test's capsys stream that is closed afterwards
    ray.data.range(1).materialize()
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
