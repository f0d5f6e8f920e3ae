"""Where a model or tokenizer is read from: its local directory, or the hub files that loading reads.

A hub id is resolved to a snapshot of the Hugging Face cache holding only what loading reads: the
config and generation config, tokenizer files, chat templates, the model's own code (`*.py`, for
`trust_remote_code`) and the weights in one format, safetensors when the repository has them. A
repository's other files (`original/*.pth`, a second weight format, documents) are never downloaded.
The loaders of both stages (`numerics`, `tokenize`) and the model fingerprint call this in every
process that needs the model and read the snapshot it returns: the processes of a node share the cache,
whose per-file locks let one of them download a file while the others wait and reuse it, so the files
come down once per node (once per cluster on a shared cache). Offline (`HF_HUB_OFFLINE=1`) or when the
hub cannot be reached, the cached snapshot serves as it is.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path

from raydpo.errors import RaydpoError, one_line

# the weight formats transformers loads, in its order of preference: one file, or shards an index names
WEIGHT_FORMATS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# the other files loading reads, at the top of the repository: config.json, generation_config.json,
# tokenizer.json, vocab.json, merges.txt, tokenizer.model, *.tiktoken, chat_template.jinja, the model code
LOADING_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
CHAT_TEMPLATES_DIR = "additional_chat_templates/"  # more chat templates, read by the tokenizer


def model_dir(
    name_or_path: str, revision: str | None = None, what: str = "model", weights: bool = True
) -> Path:
    """The local directory of a model or tokenizer: as given, or the hub snapshot of what loading reads
    (without the weights for a tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        return _hub_snapshot(name_or_path, revision, weights)
    except Exception as error:  # hub errors come in many classes; all mean "not found here"
        raise RaydpoError(
            f"{what} {name_or_path!r} is neither a local directory nor a reachable hub id: "
            f"{one_line(error, limit=200)}"
        ) from None


def loading_files(names: Iterable[str], weights: bool = True) -> list[str]:
    """The files of a repository listing that loading reads; of the weights, the single file or the
    index of shards (the shards are known once the index is read)."""
    names = set(names)
    others = {
        name
        for name in names
        if "/" not in name and name.endswith(LOADING_SUFFIXES) and not name.endswith(".index.json")
    }
    templates = {name for name in names if name.startswith(CHAT_TEMPLATES_DIR)}
    return sorted(others | templates | set(_first_weights(names) if weights else []))


def _first_weights(names: set[str]) -> list[str]:
    """The single weight file, else the index, of the first format present in a listing."""
    for weight_format in WEIGHT_FORMATS:
        present = [name for name in weight_format if name in names]
        if present:
            return present[:1]
    return []


def weight_files(directory: Path) -> list[Path]:
    """The weight files transformers loads from a model directory: the single file, else the shards its
    index names, safetensors before pytorch; empty when the directory has neither."""
    for single, index in WEIGHT_FORMATS:
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
    return []


def _hub_snapshot(repo_id: str, revision: str | None, weights: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        siblings = HfApi().model_info(repo_id, revision=revision).siblings or []
    except Exception as online_error:  # offline, unreachable or refused: a cached snapshot may serve
        return _cached_snapshot(repo_id, revision, online_error)
    wanted = loading_files((sibling.rfilename for sibling in siblings), weights)
    snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_exactly(wanted)))
    shards = [path.name for path in weight_files(snapshot) if not path.is_file()] if weights else []
    if shards:  # named by the index that came with the first call; the snapshot's name is its commit
        snapshot_download(repo_id, revision=snapshot.name, allow_patterns=_exactly(shards))
    return snapshot


def _cached_snapshot(repo_id: str, revision: str | None, online_error: Exception) -> Path:
    """The cached snapshot of the revision, as it is (`allow_patterns=[]` asks it to hold no file)."""
    from huggingface_hub import snapshot_download

    try:
        found = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[])
    except Exception:
        raise online_error from None
    return Path(found)


def _exactly(names: Iterable[str]) -> list[str]:
    """Patterns matching these names only (`allow_patterns` are fnmatch patterns)."""
    return [glob.escape(name) for name in names]
