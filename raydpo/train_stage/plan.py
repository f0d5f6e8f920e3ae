"""What the training driver and its workers agree on: the run plan, each worker's plan and its outcome.

`RunPlan` is the arithmetic of a run (steps, epochs, the pairs each step takes); `WorkerPlan` is what
the driver hands every Ray Train worker; `WorkerOutcome` is what rank 0 hands back. Each crosses a
process boundary as a JSON-compatible dict written and read here only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from raydpo.config import TrainConfig, as_dict, from_mapping
from raydpo.errors import RaydpoError


@dataclass(frozen=True)
class RunPlan:
    """How many steps the run takes and how many epochs of shuffled pairs it streams."""

    world_size: int
    train_rows: int  # pairs with finite reference values
    eval_rows: int | None
    pairs_per_step: int  # over all workers: world_size x micro_batch_size x grad_accum
    steps_per_epoch: int
    total_steps: int
    epochs_streamed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunPlan:
        return cls(**values)

    def epoch_at(self, step: int) -> float:
        """The epochs that `step` steps have taken (TRL's `epoch`)."""
        return step / self.steps_per_epoch


def plan_run(config: TrainConfig, train_rows: int, eval_rows: int | None) -> RunPlan:
    """How many steps the run takes and how many epochs of shuffled data it streams.

    Each epoch is its own seeded shuffle of the pairs, split equally between the workers (Ray Data's
    equal split drops at most world_size - 1 rows). Its steps take whole steps of its pairs: what is left
    (fewer than a step's pairs) is not trained on in that epoch.
    """
    world = config.num_workers
    per_worker_step = config.micro_batch_size * config.grad_accum
    pairs_per_step = world * per_worker_step
    if train_rows == 0:
        raise RaydpoError("no training pairs with finite reference log-probs")
    if train_rows < pairs_per_step:
        raise RaydpoError(
            f"{train_rows} training pairs cannot fill one step of {world} workers x micro batch "
            f"{config.micro_batch_size} x {config.grad_accum} accumulation = {pairs_per_step} pairs; "
            "use fewer workers or a smaller batch"
        )
    if eval_rows is not None and eval_rows == 0:
        raise RaydpoError("the eval split has no pairs with finite reference log-probs")
    steps_per_epoch = (train_rows // world) // per_worker_step
    if config.max_steps is not None:
        epochs = math.ceil(config.max_steps / steps_per_epoch)
        total_steps = config.max_steps
    else:
        epochs = config.epochs
        total_steps = epochs * steps_per_epoch
    return RunPlan(
        world_size=world,
        train_rows=train_rows,
        eval_rows=eval_rows,
        pairs_per_step=pairs_per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs_streamed=epochs,
    )


@dataclass(frozen=True)
class WorkerPlan:
    """What every training worker is handed: the run plan, the settings and what the driver resolved."""

    run: RunPlan
    config: TrainConfig
    dtype: str  # the cache's dtype, resolved by the driver: the policy loads in it
    deepspeed_config: dict[str, Any]
    tracking_uri: str
    run_id: str
    pad_token_id: int
    tokenizer: str  # saved next to the final model
    model_output: str  # where rank 0 publishes the final model
    has_eval: bool
    shared_markers: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # each rank looks for them

    def to_dict(self) -> dict[str, Any]:
        """The plan's part of Ray Train's `train_loop_config`."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        return {**values, "run": self.run.to_dict(), "config": as_dict(self.config)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkerPlan:
        return cls(
            **{
                **values,
                "run": RunPlan.from_dict(values["run"]),
                "config": from_mapping(TrainConfig, values["config"]),
            }
        )


@dataclass(frozen=True)
class WorkerOutcome:
    """What rank 0 returns to the driver at the end of a run."""

    model_path: str
    metrics: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this run took
    cpu_allocator: str | None = None  # "mimalloc" or "system" on CPUs
    prefix_sharing: bool | None = None
    stopped: str | None = None  # why the workers ended the run early (`checks.AgreedStop`): a failed run
