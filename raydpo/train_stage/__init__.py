"""Stage 2: DPO of the policy alone, on cached reference log-probs, under Ray Train and DeepSpeed ZeRO.

`driver` checks the cache and runs the TorchTrainer; `plan` holds what the driver and its workers agree
on; `loop` is the worker loop, `forward` a micro-batch's loss, `engine` the DeepSpeed layer, `checks`
what stops a run and `metrics` what a worker logs.

    raydpo train --model MODEL --data cache/ --output run/
"""

from raydpo.train_stage.driver import TrainResult, train
from raydpo.train_stage.plan import RunPlan, WorkerPlan, plan_run

__all__ = ["RunPlan", "TrainResult", "WorkerPlan", "plan_run", "train"]
