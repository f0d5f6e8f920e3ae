"""Model files: a hub id brings only what loading reads, and the model fingerprint covers what runs.

The hub tests run offline against a Hugging Face cache laid out in a temporary directory (the real
layout: `models--org--name/refs/main` naming a snapshot), or against a fake hub whose repository is a
local directory. Files that must not be read are links to /proc/self/mem: a regular file whose read
fails at offset 0 (page 0 is never mapped), even for root.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from raydpo.cache import fingerprint
from raydpo.errors import RaydpoError
from raydpo.hub import loading_files, model_dir
from raydpo.numerics import load_causal_lm
from raydpo.tokenize import load_tokenizer

UNREADABLE = Path("/proc/self/mem")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEVER_READ = ("pytorch_model.bin", "original/consolidated.00.pth", "original/params.json")

needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc/self/mem")

# the listing of meta-llama/Llama-3.1-8B-Instruct on the hub
LLAMA_LISTING = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00004.safetensors",
    "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors",
    "model.safetensors.index.json",
    "original/consolidated.00.pth",
    "original/params.json",
    "original/tokenizer.model",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture
def digests(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprint.DIGEST_CACHE_ENV, str(tmp_path / "digests"))


def with_trap(directory: Path, names=NEVER_READ) -> None:
    """Files named as a repository's extras, each failing when read."""
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).symlink_to(UNREADABLE)
    (directory / "README.md").write_text("# a model\n")


def same_weights(model, other) -> bool:
    weights, others = model.state_dict(), other.state_dict()
    return weights.keys() == others.keys() and all(torch.equal(weights[n], others[n]) for n in weights)


def test_loading_files_of_hub_listings():
    """One weight format (safetensors first; of shards, the index), config, tokenizer, chat templates and
    the model's code; nothing under original/, no documents, no second format."""
    assert loading_files(LLAMA_LISTING) == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    remote_code_pytorch = [
        "config.json",
        "configuration_x.py",
        "modeling_x.py",
        "tokenization_x.py",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "tf_model.h5",
        "tokenizer.model",
        "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja",
        "README.md",
    ]
    assert loading_files(remote_code_pytorch) == [
        "additional_chat_templates/tool_use.jinja",
        "chat_template.jinja",
        "config.json",
        "configuration_x.py",
        "modeling_x.py",
        "pytorch_model.bin.index.json",
        "tokenization_x.py",
        "tokenizer.model",
    ]
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    assert loading_files(both) == ["config.json", "model.safetensors"]


def test_model_fingerprint_covers_remote_code(toy_model, tmp_path, digests):
    """The `*.py` files a trust_remote_code model runs are in its fingerprint: an unchanged copy has the
    same one, an edited modeling file another; a model without code keeps the keys it had."""
    model = tmp_path / "remote"
    shutil.copytree(toy_model, model)
    (model / "configuration_toy_remote.py").write_text("from transformers import LlamaConfig\n")
    (model / "modeling_toy_remote.py").write_text("from transformers import LlamaForCausalLM\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_toy_remote.ToyRemoteConfig",
        "AutoModelForCausalLM": "modeling_toy_remote.ToyRemoteForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)

    original = fingerprint.model_fingerprint(str(model))
    assert fingerprint.model_fingerprint(str(copy)) == original
    assert set(fingerprint.model_fingerprint(str(toy_model))) == {
        "config_sha256",
        "weights_sha256",
        "model_type",
    }
    (copy / "modeling_toy_remote.py").write_text("from transformers import LlamaForCausalLM  # edited\n")
    edited = fingerprint.model_fingerprint(str(copy))
    assert [key for key in original if edited[key] != original[key]] == ["code_sha256"]
    assert fingerprint.cache_key({"model": edited}) != fingerprint.cache_key({"model": original})


@needs_proc
def test_hub_id_loads_from_an_offline_cache_reading_only_what_loading_needs(
    toy_model, tokenizer, tmp_path, monkeypatch, digests
):
    """HF_HUB_OFFLINE with a cached snapshot holding a second weight format and original/*.pth: the
    fingerprint, the tokenizer and the model come from the snapshot, and the extras are never read (a
    read fails). The fingerprint is the toy directory's: the same files decide it."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--toy"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(toy_model, snapshot)
    with_trap(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError):
        (snapshot / "pytorch_model.bin").read_bytes()

    assert model_dir("org/toy") == snapshot
    assert fingerprint.model_fingerprint("org/toy") == fingerprint.model_fingerprint(str(toy_model))
    text = "a chosen answer"
    assert load_tokenizer("org/toy").encode(text) == tokenizer.encode(text)
    loaded = load_causal_lm("org/toy", "float32", None, trust_remote_code=False)
    assert same_weights(loaded, load_causal_lm(str(toy_model), "float32", None, trust_remote_code=False))


@needs_proc
def test_hub_id_downloads_one_weight_format_and_the_shards_its_index_names(
    toy_model, tmp_path, monkeypatch, digests
):
    """Online (a fake hub serving a local repository): a tokenizer asks for no weights; a model for the
    loading files and the index, then for exactly the shards the index names, at the commit the first
    call resolved; the snapshot loads."""
    remote = tmp_path / "remote"
    load_causal_lm(str(toy_model), "float32", None, False).save_pretrained(remote, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(toy_model / name, remote / name)
    with_trap(remote)
    shards = sorted(
        set(json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    assert len(shards) > 1
    listing = [str(path.relative_to(remote)) for path in remote.rglob("*") if not path.is_dir()]
    requested = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        names = list(huggingface_hub.utils.filter_repo_objects(listing, allow_patterns=allow_patterns))
        requested.append((revision, sorted(names)))
        snapshot = tmp_path / "cache" / COMMIT
        for name in names:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in listing])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    loading = ["chat_template.jinja", "config.json", "generation_config.json"]
    tokenizer_files = ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer("org/toy").chat_template == load_tokenizer(str(toy_model)).chat_template
    assert requested == [(None, loading + tokenizer_files)]
    assert model_dir("org/toy") == tmp_path / "cache" / COMMIT
    assert requested[1:] == [
        (None, [*loading, "model.safetensors.index.json", *tokenizer_files]),
        (COMMIT, shards),
    ]
    assert fingerprint.model_fingerprint("org/toy")["model_type"] == "llama"
    loaded = load_causal_lm("org/toy", "float32", None, trust_remote_code=False)
    assert same_weights(loaded, load_causal_lm(str(toy_model), "float32", None, trust_remote_code=False))


def test_a_hub_id_neither_cached_nor_reachable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        RaydpoError, match=r"^model 'org/missing' is neither a local directory nor a reachable"
    ):
        fingerprint.model_fingerprint("org/missing")
    with pytest.raises(RaydpoError, match=r"^tokenizer 'org/missing' is neither"):
        load_tokenizer("org/missing")
