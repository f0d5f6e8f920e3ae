"""Joining Ray and checking, before any work starts, that a stage's actors leave room for its data tasks."""

from __future__ import annotations

import os
from typing import Any

from raydpo.errors import RaydpoError


def init_ray(address: str | None) -> None:
    """Join the given cluster (or start a local instance) unless this process is already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def worker_env() -> dict[str, Any] | None:
    """A runtime env passing this process's `RAYDPO_*` variables (fault drills) to Ray workers and actors."""
    env = {key: value for key, value in os.environ.items() if key.startswith("RAYDPO_")}
    return {"env_vars": env} if env else None


def check_cpu_headroom(actors: int, cpus_per_actor: float, what: str, hint: str) -> None:
    """On a single machine, actors that take every CPU leave none for Ray Data's read and transform
    tasks, and Ray would wait forever; say so instead. (A cluster can add nodes, so it is not checked.)"""
    import ray

    if sum(node["Alive"] for node in ray.nodes()) != 1:
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    if actors * cpus_per_actor >= cpus:
        raise RaydpoError(
            f"{actors} {what} x {cpus_per_actor:g} CPUs take all {cpus:g} CPUs, leaving none to read the data; "
            f"{hint} (fractions are allowed)"
        )
