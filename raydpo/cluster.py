"""Joining Ray, the environment of Ray workers, and checking, before any work starts, that a stage's
actors leave room for its data tasks."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from raydpo.errors import RaydpoError

logger = logging.getLogger(__name__)

MIMALLOC_PACKAGE = "cmeel-mimalloc"
MIMALLOC_LIBRARY = "libmimalloc.so"


def init_ray(address: str | None) -> None:
    """Join the given cluster (or start a local instance) unless this process is already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def worker_env(env_vars: dict[str, str] | None = None) -> dict[str, Any] | None:
    """A runtime env for Ray workers and actors: `env_vars`, and this process's `RAYDPO_*` variables
    (fault drills)."""
    env = {key: value for key, value in os.environ.items() if key.startswith("RAYDPO_")}
    env.update(env_vars or {})
    return {"env_vars": env} if env else None


def cpu_allocator_env(allocator: str) -> dict[str, str]:
    """The environment that makes a worker process allocate with `allocator` from its start.

    mimalloc is preloaded (LD_PRELOAD, so torch's and DeepSpeed's C++ allocations use it too) and keeps
    the memory it frees committed for reuse: a training step allocates the same sizes again."""
    if allocator == "system":
        return {}
    if not sys.platform.startswith("linux"):
        logger.warning(
            "cpu_allocator=%s is preloaded with LD_PRELOAD, which needs Linux: not used", allocator
        )
        return {}
    # Ray expands ${LD_PRELOAD} from the node's environment: what a node already preloads stays loaded
    return {"LD_PRELOAD": f"{mimalloc_library()} ${{LD_PRELOAD}}", "MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> str:
    """The path of the mimalloc shared library the `cmeel-mimalloc` wheel installed."""
    from importlib import metadata

    hint = f"cpu_allocator=mimalloc needs the {MIMALLOC_PACKAGE} package (or set cpu_allocator=system)"
    try:
        files = metadata.files(MIMALLOC_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise RaydpoError(hint) from None
    for file in files:
        if file.name == MIMALLOC_LIBRARY:
            return str(file.locate())
    raise RaydpoError(f"{hint}: its {MIMALLOC_LIBRARY} is missing")


def preloaded(library: str) -> bool:
    """Whether `library` is mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any(library in line for line in maps)
    except OSError:
        return False


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
