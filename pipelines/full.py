"""The raydpo job: precompute the reference log-probs (train and eval splits), train, then report.

Stage 1 (`precompute:` section) caches the reference log-probs; stage 2 (`train:` section) trains the
policy on them with DeepSpeed ZeRO-3 under Ray Train and logs to MLflow. `train.model` and
`train.data` default to the precompute's model and output.

With no arguments it is the smoke run on the embedded default: a local Ray instance, the sample
preference data shipped with raydpo, and a small model created locally (no download, no cluster).

    python pipelines/full.py                                   # smoke run
    python pipelines/full.py --config pipelines/configs/smoke.yaml --set precompute.batch_size=4
    ray job submit --working-dir . -- python pipelines/full.py --config my.yaml

Inside a Ray job, Ray connects to the cluster the job was submitted to; run directly, it starts a
local instance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raydpo.config import load
from raydpo.console import keep_log_in, run_command
from raydpo.job import precompute_config

SMOKE_CONFIG = Path(__file__).parent / "configs" / "smoke.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(SMOKE_CONFIG), help="YAML config (default: the smoke run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. train.beta=0.05 (repeatable)",
    )
    args = parser.parse_args(argv)

    def command() -> None:
        values = load(args.config, args.set)
        config = precompute_config(values)
        train_section = values.get("train")

        import raydpo
        from raydpo.job import train_config_for

        if train_section is None:
            keep_log_in(config.output)
            result = raydpo.precompute(config)
            print("precompute:\n  " + result.summary().replace("\n", "\n  "))
        else:
            keep_log_in(train_config_for(config, train_section).output)  # the run directory
            job = raydpo.run(config, train_section)
            print("precompute:\n  " + job.precompute.summary().replace("\n", "\n  "))
            print("train:\n  " + job.train.summary().replace("\n", "\n  "))
            print("report:\n  " + job.summary().replace("\n", "\n  "))

    return run_command("full.py", command, log="job")


if __name__ == "__main__":
    sys.exit(main())
