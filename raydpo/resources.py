"""What a stage's processes get from the cluster: how many actors and workers it fits by default, their
threads, their memory allocator, and their devices (a CPU process sees no GPU; a GPU process checks
that torch can use one); checks that the actors leave room for the data tasks.
"""

from __future__ import annotations

import logging
import os
import sys

from raydpo.cluster import NODE_SECONDS, on_other_nodes
from raydpo.errors import RaydpoError, raised_within

logger = logging.getLogger(__name__)

MIMALLOC_PACKAGE = "cmeel-mimalloc"
MIMALLOC_LIBRARY = "libmimalloc.so"

CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def cpu_process_env(allocator: str) -> dict[str, str]:
    """The environment of a scorer actor or training worker that runs on CPUs: no GPU visible, and
    `allocator` preloaded."""
    return {**CPU_ONLY_ENV, **cpu_allocator_env(allocator)}


def cpu_allocator_env(allocator: str) -> dict[str, str]:
    """The environment that makes a worker process allocate with `allocator` from its start.

    mimalloc is preloaded (LD_PRELOAD, so torch's and DeepSpeed's C++ allocations use it too) and keeps
    the memory it frees committed for reuse: a training step allocates the same sizes again. One
    runtime env serves every node, so each node must have the library where this one has it."""
    if allocator == "system":
        return {}
    if not sys.platform.startswith("linux"):
        logger.warning(
            "cpu_allocator=%s is preloaded with LD_PRELOAD, which needs Linux: not used", allocator
        )
        return {}
    library = mimalloc_library()
    for node, found in on_other_nodes(node_mimalloc_library).items():
        if found != library:
            raise RaydpoError(
                f"cpu_allocator=mimalloc: node {node} has {found or f'no {MIMALLOC_PACKAGE}'} where this "
                f"node has {library}; install the same environment on every node, or set cpu_allocator=system"
            )
    # Ray expands ${LD_PRELOAD} from the node's environment: what a node already preloads stays loaded
    return {"LD_PRELOAD": f"{library} ${{LD_PRELOAD}}", "MIMALLOC_PURGE_DELAY": "-1"}


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


def node_mimalloc_library() -> str | None:
    """Where the node this runs on has the mimalloc library (None: it has none)."""
    try:
        return mimalloc_library()
    except RaydpoError:
        return None


def preloaded(library: str) -> bool:
    """Whether `library` is mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any(library in line for line in maps)
    except OSError:
        return False


def allocator_in_effect(requested: str, who: str) -> str:
    """The allocator this process runs with ("mimalloc" or "system"); a warning naming WHO if it is not
    the one REQUESTED (the preload failed)."""
    allocator = "mimalloc" if preloaded(MIMALLOC_LIBRARY) else "system"
    if allocator != requested:
        logger.warning("%s: cpu_allocator=%s is not in effect (preload failed)", who, requested)
    return allocator


def cpu_threads(cpus_each: float, processes: int) -> int:
    """Torch threads of a CPU process (a scorer, a training worker): the cores this process may run on,
    shared among the `processes` beside it, and at least the CPUs Ray reserved for it.

    Forwards and backwards are matrix work that scales with threads, and the Ray Data tasks beside them
    are light, so one scorer or one training worker on a 2-core machine runs 2 threads rather than the
    1 CPU Ray reserved for it (Ray sets OMP_NUM_THREADS to that)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, int(cpus_each), cores // processes)


def default_workers(use_gpu: bool, cpus_each: float) -> tuple[int, str]:
    """The training workers of a run that sets none, from the cluster joined, and why.

    With GPUs: one per GPU of the cluster, as `torchrun --nproc-per-node gpu` does on a node. On CPUs:
    one per node, running on all of its cores (`cpu_threads`). There, threads of one process split each
    matrix product, while processes split the batch and then also exchange weights and gradients, which
    is slower on the same cores (measured in docs/benchmarks.md)."""
    return default_processes(1.0 if use_gpu else 0.0, cpus_each, "use_gpu", "--num-workers")


def default_processes(gpus_each: float, cpus_each: float, asked: str, flag: str) -> tuple[int, str]:
    """How many processes of a stage (training workers, scorer actors) a run that sets none gets from
    the cluster joined, and why: with `gpus_each` > 0, as many as each node's GPUs hold at that share
    (and its CPUs at `cpus_each`, which Ray reserves beside them); on CPUs, one per node that has CPUs,
    each on all of its node's cores. ASKED names the setting that asked for GPUs and FLAG the one that
    sets the count, for the error of a cluster without room for one."""
    nodes = alive_node_resources()
    if gpus_each:
        gpus = sum(node.get("GPU", 0) for node in nodes)
        # a process takes its GPUs on one node; the small term: 1 GPU at 0.1 each holds 10, 1 // 0.1 is 9
        count = sum(min(_fits(node, "GPU", gpus_each), _fits(node, "CPU", cpus_each)) for node in nodes)
        if count == 0:
            has = (
                f"no node that holds one at {gpus_each:g} GPU and {cpus_each:g} CPU each"
                if gpus
                else "no GPUs"
            )
            raise RaydpoError(
                f"{asked}: the Ray cluster has {has} now; set {flag} "
                "(an autoscaling cluster then adds the GPU nodes they need)"
            )
        if gpus_each == 1 and count == gpus:
            return count, f"one per GPU of the cluster ({gpus:g})"
        return (
            count,
            f"as many as the cluster's {gpus:g} GPUs hold at {gpus_each:g} GPU and {cpus_each:g} CPU each",
        )
    with_cpus = sum(1 for node in nodes if node.get("CPU", 0) > 0)
    if with_cpus == 0:
        raise RaydpoError(f"the Ray cluster has no node with CPUs now; set {flag}")
    return with_cpus, f"one per node with CPUs ({with_cpus}), each on all of its node's cores"


def _fits(node: dict[str, float], resource: str, each: float) -> int | float:
    """How many processes that take EACH of RESOURCE a node holds (any number where EACH is 0)."""
    return int(node.get(resource, 0) / each + 1e-9) if each else float("inf")


def processes_per_node(processes: int) -> int:
    """How many of a stage's CPU processes share a node when Ray spreads PROCESSES over the nodes that
    have CPUs (Ray Data spreads its actors, and raydpo its CPU training workers)."""
    nodes = sum(1 for node in alive_node_resources() if node.get("CPU", 0) > 0)
    return -(-processes // max(1, nodes))


def alive_node_resources() -> list[dict[str, float]]:
    """The resources (CPU, GPU, memory, ...) of each alive node of the cluster joined."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def warn_unused_gpus(what: str, cure: str) -> None:
    """A warning where the cluster joined has GPUs while WHAT run on CPUs: a model scored or trained on
    CPUs is slower by orders of magnitude, and nothing else would say why."""
    gpus = sum(node.get("GPU", 0) for node in alive_node_resources())
    if gpus:
        plural = "s" if gpus != 1 else ""
        logger.warning(
            "the Ray cluster has %g GPU%s and the %s run on CPUs: %s to use them", gpus, plural, what, cure
        )


def check_gpus_usable(who: str) -> None:
    """Stop with one line where Ray gave this process GPUs that torch cannot use: a CPU build of torch on
    a GPU node (what a plain `pip install torch` gives on some platforms), or a driver torch cannot load.
    Unchecked, a scorer would run on CPUs at a fraction of the speed, and a training worker fail deep
    inside torch."""
    import ray
    import torch

    gpus = ray.get_gpu_ids()
    if not gpus or torch.cuda.is_available():
        return
    cause = (
        "a CPU-only build: install a CUDA build of torch on the GPU nodes"
        if torch.version.cuda is None
        else f"a CUDA {torch.version.cuda} build that finds no device: check the NVIDIA driver"
    )
    raise RaydpoError(
        f"{who} on node {ray.util.get_node_ip_address()} has GPU {','.join(map(str, gpus))} from Ray, but "
        f"torch {torch.__version__} sees no CUDA device ({cause})"
    )


def probe_gpus(who: str) -> None:
    """`check_gpus_usable` in a task on a GPU of the cluster, before a stage's processes start, where a GPU
    is free now (none free: the processes check when they start). A training worker could not run the
    check itself: Ray Train sets up NCCL first, which fails on a CPU build of torch with a line that does
    not say why."""
    import ray
    from ray.exceptions import GetTimeoutError

    if ray.available_resources().get("GPU", 0) < 1:
        return
    probe = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(check_gpus_usable).remote(who)
    try:
        ray.get(probe, timeout=NODE_SECONDS)
    except GetTimeoutError:  # the GPU was taken meanwhile
        ray.cancel(probe, force=True)
    except Exception as error:
        raise (raised_within(error) or error) from None


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
