"""A hyperparameter sweep on one cached reference: precompute once, then one training run per setting.

Every run reads the same precompute output (a cache hit after the first job), so a sweep over `beta`
or loss types never recomputes the reference. Each run is its own MLflow run under one experiment;
the script ends with a table of the final eval metrics.

    python pipelines/sweep.py --sweep train.beta=0.05,0.1,0.5                      # on the smoke config
    python pipelines/sweep.py --config my.yaml --sweep train.loss_type=sigmoid,ipo --sweep train.beta=0.1,0.3
    ray job submit --working-dir . -- python pipelines/sweep.py --config my.yaml --sweep train.beta=0.05,0.1
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from raydpo.config import apply_overrides, load
from raydpo.console import keep_log_in, run_command
from raydpo.errors import RaydpoError
from raydpo.job import precompute_config, train_config_for
from raydpo.tracking import resolve_tracking_uri

SMOKE_CONFIG = Path(__file__).parent / "configs" / "smoke.yaml"

SHOWN = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "loss", "rewards/accuracies")


def grid(sweeps: list[str]) -> list[dict[str, str]]:
    """["train.beta=0.1,0.2", "train.loss_type=sigmoid,ipo"] -> the 4 combinations as override dicts."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key.startswith("train.") or not values:
            raise RaydpoError(f"--sweep takes train.KEY=V1,V2,...; got {item!r}")
        axes.append([(key, value) for value in values.split(",")])
    return [dict(combination) for combination in itertools.product(*axes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(SMOKE_CONFIG), help="YAML config (default: the smoke run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--sweep", action="append", required=True, metavar="train.KEY=V1,V2")
    args = parser.parse_args(argv)

    def command() -> None:
        import raydpo

        combinations = grid(args.sweep)  # a malformed --sweep stops before the smoke model is built
        values = load(args.config, args.set)
        config = precompute_config(values)
        base = dict(values.get("train") or {})
        base_output = base.get("output", "raydpo-sweep")
        # one MLflow store for the whole sweep (default: SQLite in the sweep's directory)
        base.setdefault("mlflow_tracking_uri", resolve_tracking_uri(None, base_output))
        keep_log_in(base_output)
        points = []
        for index, overrides in enumerate(combinations):
            name = "-".join(f"{key.removeprefix('train.')}={value}" for key, value in overrides.items())
            section = apply_overrides({"train": dict(base)}, [f"{k}={v}" for k, v in overrides.items()])[
                "train"
            ]
            section["output"] = f"{base_output}/{index:02d}-{name}"
            section.setdefault("experiment", "raydpo-sweep")
            train_config_for(config, section)  # every point's settings are checked before the first runs
            points.append((name, section))
        runs = []
        for index, (name, section) in enumerate(points):
            job = raydpo.run(config, section)  # the precompute is a cache hit after the first run
            runs.append((name, job))
            print(f"[{index + 1}/{len(combinations)}] {name}: {job.train.summary().splitlines()[0]}")
        print("\n" + table(runs))

    return run_command("sweep.py", command, log="sweep")


def table(runs) -> str:
    rows = ["| run | " + " | ".join(SHOWN) + " | MLflow run |", "|" + " --- |" * (len(SHOWN) + 2)]
    for name, job in runs:
        figures = [f"{job.train.metrics[key]:.4f}" if key in job.train.metrics else "-" for key in SHOWN]
        rows.append(f"| {name} | " + " | ".join(figures) + f" | {job.train.run_id} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
