"""The example job configs in pipelines/configs/ against the cluster file they are launched with: each
loads and validates as `pipelines/full.py` reads it, and asks for no more GPUs than cluster.yaml's
nodes hold."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml

from raydpo.config import load
from raydpo.job import train_config_for

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))
# GPUs of the AWS instance types that cluster.yaml uses or its comments suggest. A node type may state its
# own count instead (`resources: {GPU: n}`), which Ray's autoscaler takes over what it detects.
AWS_GPUS = {"m6i.2xlarge": 0, "g5.xlarge": 1, "g6e.xlarge": 1, "p4d.24xlarge": 8}
RAY_DEFAULT_MAX_WORKERS = 2  # a cluster file without max_workers


def node_gpus(name: str, node: dict) -> int:
    """GPUs of one node of a node type: as its `resources` state them, else its instance type's."""
    stated = (node.get("resources") or {}).get("GPU")
    if stated is not None:
        return stated
    instance = node["node_config"]["InstanceType"]
    if instance not in AWS_GPUS:
        pytest.fail(
            f"cluster.yaml node type {name}: add instance type {instance} to AWS_GPUS with its GPU count, or "
            "state it in the file as `resources: {GPU: n}`"
        )
    return AWS_GPUS[instance]


def cluster_gpus(cluster: dict) -> int:
    """The most GPUs the cluster holds at once: the head's, and the worker node types with the most GPUs
    per node first, each up to its `max_workers`, all together up to the cluster's `max_workers`."""
    types, head = cluster["available_node_types"], cluster["head_node_type"]
    per_node = {name: node_gpus(name, node) for name, node in types.items()}
    total = per_node[head]
    workers_left = cluster.get("max_workers", RAY_DEFAULT_MAX_WORKERS)
    for name in sorted((name for name in types if name != head), key=per_node.get, reverse=True):
        count = min(types[name].get("max_workers", workers_left), workers_left)
        total += count * per_node[name]
        workers_left -= count
    return total


@pytest.fixture()
def job(tmp_path, monkeypatch):
    """`pipelines/full.py`'s reading of a job config (the smoke run's local model stands in as a stub)."""
    import raydpo.toy

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(raydpo.toy, "build_toy_model", lambda *args, **kwargs: model)
    monkeypatch.syspath_prepend(str(ROOT / "pipelines"))
    import full

    yield full
    sys.modules.pop("full", None)


def gpus_asked(full, values: dict) -> int:
    """The most GPUs a job config asks for at a time: its scorer actors, then its training workers (the
    stages run one after the other), each validated as the job validates it. Without `num_actors` or
    `num_workers` a stage takes the GPUs the cluster has: at least one."""
    precompute = full.precompute_config(values)
    scoring = math.ceil((precompute.num_actors or 1) * precompute.gpus_per_actor)
    train = train_config_for(precompute, values.get("train") or {})
    return max(scoring, (train.num_workers or 1) if train.use_gpu else 0)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_example_config_fits_the_cluster_file(config, job):
    available = cluster_gpus(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    asked = gpus_asked(job, load(config))
    assert asked <= available, f"{config.name} asks for {asked} GPUs; cluster.yaml holds at most {available}"


def test_gpu_counts_follow_the_files(job):
    """The count is the files' own: a stated GPU resource, the instance type, the caps on workers, and
    each stage's setting (a config asking for more than the cluster holds is caught)."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = cluster["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"] == "g5.xlarge" and not workers["resources"]
    assert cluster_gpus(cluster) == 8  # 8 workers of one GPU, the head none
    workers["resources"] = {"GPU": 4}
    assert cluster_gpus(cluster) == 32
    cluster["max_workers"] = 2
    assert cluster_gpus(cluster) == 8
    config = ROOT / "pipelines" / "configs" / "7b-multinode.yaml"
    assert gpus_asked(job, load(config, ["precompute.num_actors=16", "train.num_workers=2"])) == 16
    assert gpus_asked(job, load(config, ["precompute.num_actors=3", "train.num_workers=12"])) == 12
    cpu_training = ["train.use_gpu=false", "precompute.num_actors=5", "precompute.gpus_per_actor=0.5"]
    assert gpus_asked(job, load(config, cpu_training)) == 3
