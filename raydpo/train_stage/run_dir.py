"""A training run's own places: its run directory (OUTPUT, with run.json and the final model) and its
checkpoint directory in the storage path, `{storage_path}/{storage_name}`.

Several runs may share one storage path (Ray's convention: one storage path, each run under its name),
so a run's checkpoint directory is named after its OUTPUT: a readable name and a short hash of the
full location, so that two outputs with the same base name do not collide. A run only ever clears its
own directories, and `--resume` finds its own by the name recorded in run.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raydpo import cache
from raydpo.errors import RaydpoError, one_line

RUN_STATE = "run.json"
MODEL_DIR = "model"
LEGACY_STORAGE_NAME = "raydpo"  # where runs recorded without a storage name keep their checkpoints

# the order in which the workers take the pairs: epochs split on their own (`epochs`), a place in
# an epoch counted in micro-batches; a run's checkpoints resume only under the same, and with the same
# settings that decide it
DATA_ORDER = "epochs-v1"
DATA_ORDER_SETTINGS = (
    "micro_batch_size",
    "grad_accum",
    "shuffle",
    "shuffle_buffer",
    "seed",
    "balance_ranks",
    "epochs",
    "max_steps",
)


@dataclass
class RunState:
    """What run.json records of the run in a run directory; read and written only here."""

    data_key: str  # the cache key of the training split the run trains on
    layout: dict[str, Any] | None = None  # what its checkpoints are laid out by (`checkpoint_layout`)
    data_order: str | None = DATA_ORDER
    status: str | None = None  # running, failed, interrupted or finished
    run_id: str | None = None  # the MLflow run
    tracking_uri: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the settings it runs with
    storage_name: str | None = None  # its checkpoint directory in the storage path
    checkpoints: str | None = None  # the full location of that directory
    model_path: str | None = None  # the final model, once published

    @property
    def started_with(self) -> int | None:
        """The number of workers the run started with (None: recorded without it)."""
        return self.config.get("num_workers")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str).encode()

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> RunState:
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown or "data_key" not in values:
            problem = f"unknown fields {unknown}" if unknown else "no data_key"
            raise RaydpoError(f"{where} is not a run state this raydpo reads ({problem}); use another output")
        return cls(**values)


def read_state(fs: pafs.FileSystem, run_dir: str) -> RunState | None:
    """The run recorded in RUN_DIR, or None where there is none."""
    values = cache.read_json(fs, f"{run_dir}/{RUN_STATE}")
    return None if values is None else RunState.from_dict(values, f"{run_dir}/{RUN_STATE}")


def write_state(fs: pafs.FileSystem, run_dir: str, state: RunState) -> None:
    cache.write_bytes_atomic(fs, f"{run_dir}/{RUN_STATE}", state.to_json())


def default_storage_name(output: str) -> str:
    """OUTPUT's base name and 8 hex digits of a hash of its full location (a URI's query left out)."""
    where = output.partition("?")[0].rstrip("/") if cache.is_uri(output) else cache.location(output)
    base = re.sub(r"[^\w.-]+", "-", where.rsplit("/", 1)[-1]).strip("-.") or "run"
    return f"{base}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def storage_name(configured: str | None, output: str, recorded: RunState | None, resume: bool) -> str:
    """The run's directory in the storage path: the one a resumed run recorded, else as configured,
    else `default_storage_name`."""
    if resume and recorded is not None:
        started_in = recorded.storage_name or LEGACY_STORAGE_NAME
        if configured is not None and configured != started_in:
            raise RaydpoError(
                f"--resume: the run keeps its checkpoints under {started_in!r}, not {configured!r}; "
                "resume without --storage-name or with the name it started with"
            )
        return started_in
    return configured or default_storage_name(output)


def check_writable(storage_path: str) -> None:
    """Refuse a storage path the run cannot write to, before any work: a probe file of its own (runs
    that share the path probe at once) is written and removed at its root."""
    fs, root = cache.resolve(storage_path)
    probe = f"{root}/.raydpo-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except OSError as error:
        raise RaydpoError(f"the storage path {storage_path} is not writable: {one_line(error)}") from error


def rerun_hint(checkpoints: str) -> str:
    """How a failed run goes on: from its latest checkpoint, or, with none written, from the start."""
    fs, root = cache.resolve(checkpoints)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:  # the storage cannot be listed now: say where to look
        return f"rerun with --resume to continue from the latest checkpoint in {checkpoints}"
    names = sorted(
        info.base_name
        for info in found
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint-")
    )
    if not names:
        return "no checkpoint was written: rerun with --resume to start again in the same MLflow run"
    return f"rerun with --resume to continue from {names[-1]} in {checkpoints}"


# what a checkpoint's DeepSpeed state is laid out by: a resumed run must load it into the same
LAYOUT_SETTINGS = (
    "model",
    "zero_stage",
    "dtype",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)


def checkpoint_layout(config, ds_config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's state depends on, as the run applies them (the ZeRO stage and dtype
    of the built DeepSpeed config, so `auto` and a DeepSpeed file count by what they decide)."""
    dtype = next((name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled")), "fp32")
    applied = {"zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0), "dtype": dtype}
    return {name: applied.get(name, getattr(config, name, None)) for name in LAYOUT_SETTINGS}


def check_layout(recorded: dict[str, Any] | None, layout: dict[str, Any]) -> None:
    """Refuse to resume checkpoints laid out by other settings, naming the first that changed."""
    for name, value in (recorded or {}).items():
        if name in layout and layout[name] != value:
            raise RaydpoError(
                f"--resume: {name} changed since the run started ({value!r}, now {layout[name]!r}); its "
                "checkpoints cannot be loaded with it: resume with the setting it started with, or start "
                "over with --overwrite"
            )


def run_state(config, state: RunState | None, data_key: str, layout: dict[str, Any]) -> tuple[RunState, bool]:
    """The state to run with, and whether what OUTPUT holds must be cleared first: start, resume or
    (with overwrite) replace the run in OUTPUT, whose recorded STATE is read once by the caller; refuse
    to mix runs. Nothing is changed here."""
    if state is None:
        if config.resume:
            raise RaydpoError(f"--resume: {config.output} holds no run to resume")
        return RunState(data_key=data_key, layout=layout), True
    if config.overwrite:
        return RunState(data_key=data_key, layout=layout), True
    if state.status == "finished":
        raise RaydpoError(f"{config.output} holds a finished run; pass --overwrite to train again there")
    if not config.resume:
        raise RaydpoError(
            f"{config.output} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
        )
    if state.data_key != data_key:
        raise RaydpoError("--resume: the precompute output changed since the run started; it cannot continue")
    if state.data_order != DATA_ORDER:
        raise RaydpoError(
            "--resume: the run's checkpoints do not record their place in its epochs (an earlier raydpo "
            "wrote them); start it over with --overwrite"
        )
    recorded = state.config
    changed = [
        name for name in DATA_ORDER_SETTINGS if name in recorded and recorded[name] != getattr(config, name)
    ]
    if changed:
        raise RaydpoError(
            f"--resume: {', '.join(changed)} changed since the run started, and each checkpoint holds its "
            "place in the data in the run's own terms; resume with the settings it started with"
        )
    workers = state.started_with
    if workers is not None and workers != config.num_workers:
        # each worker's checkpoint holds its ZeRO partition and its place in its own shard of the data
        raise RaydpoError(
            f"--resume: the run started with {workers} workers and its checkpoints hold their "
            f"partitions; resume with --num-workers {workers} (or without --num-workers)"
        )
    check_layout(state.layout, layout)
    return state, False


def clear_run(fs: pafs.FileSystem, run_dir: str, checkpoints: str) -> None:
    """Remove a replaced run's checkpoints and final model (a new run's stale checkpoints too): its own
    checkpoint directory, never anything else in the storage path."""
    storage_fs, root = cache.resolve(checkpoints)
    if storage_fs.get_file_info(root).type == pafs.FileType.Directory:
        if isinstance(storage_fs, pafs.LocalFileSystem):
            shutil.rmtree(root)
        else:
            storage_fs.delete_dir(root)
    fs.create_dir(run_dir, recursive=True)
    model = f"{run_dir}/{MODEL_DIR}"
    if fs.get_file_info(model).type == pafs.FileType.Directory:
        fs.delete_dir(model)
