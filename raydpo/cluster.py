"""Joining Ray, the environment of Ray workers, and the checks a cluster needs before any work starts:
that a stage's actors leave room for its data tasks, and that every node sees the paths a stage uses.

Ray resolves an unspecified address again in every process that asks: Ray Train's placement-group
cleaner and Ray Data's detectors query the State API from inside the cluster. With a second Ray
instance on the host those lookups find the wrong instance or refuse ("Found multiple active Ray
instances"), and a cleaner that asks the wrong instance takes the controller for dead and removes the
run's placement group. So the address joined is pinned: RAY_ADDRESS in the job's runtime env, which
every worker and actor of the job inherits.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from raydpo.errors import RaydpoError, raised_within
from raydpo.faults import fault_env

logger = logging.getLogger(__name__)

MIMALLOC_PACKAGE = "cmeel-mimalloc"
MIMALLOC_LIBRARY = "libmimalloc.so"
RAY_ADDRESS = "RAY_ADDRESS"
GCS_PORT = "RAY_GCS_SERVER_PORT"
PROBE_SECONDS = 3.0  # a live GCS accepts at once; a dead head's port refuses or stays silent
NODE_SECONDS = 120.0  # for a task on each node to start and answer
_joined = False  # whether init_ray connected this process to Ray


def init_ray(address: str | None, **options: Any) -> str:
    """Join the cluster at `address` (else $RAY_ADDRESS, else the one `ray start` recorded on this
    host) or start a local instance, unless this process is already connected; returns the GCS address.

    `options` go to `ray.init` when a local instance is started (num_cpus, include_dashboard, ...)."""
    import ray

    global _joined
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    _joined = True
    log_to_driver = options.pop("log_to_driver", True)
    target = join_address(address)
    if target is None:
        return _start_local(log_to_driver, options)
    if "://" in target:  # Ray Client: the cluster side resolves nothing from this process
        ray.init(address=target, log_to_driver=log_to_driver)
        return target
    from ray._private.services import canonicalize_bootstrap_address

    pinned = canonicalize_bootstrap_address(target)  # "localhost" becomes an address other nodes can use
    ray.init(address=pinned, log_to_driver=log_to_driver, runtime_env=_pinned_env(pinned))
    return pinned


def leave_ray() -> None:
    """Disconnect from Ray (and stop the local instance) if `init_ray` connected this process; a
    connection made by `ray.init()` is left alone. Entry points call it when a command that connected
    ends, so that workers' late lines do not trail the command's last line."""
    global _joined
    if _joined:
        import ray

        ray.shutdown()
        _joined = False


def join_address(address: str | None) -> str | None:
    """The address of the cluster to join, or None to start a local instance, decided within seconds.

    An address the user gave (`address`, or $RAY_ADDRESS) that nothing answers at is an error. The
    address `ray start` recorded in the Ray temp dir is only a default: a head that died without
    `ray stop` leaves it behind, and Ray would wait for it forever, so a local instance is started."""
    given, source, cure = address, "--ray-address", "leave --ray-address out"
    if not given and os.environ.get(RAY_ADDRESS):
        given, source, cure = os.environ[RAY_ADDRESS], "$RAY_ADDRESS", "unset RAY_ADDRESS"
    if given == "local":
        return None
    if given and given != "auto":
        if "://" not in given and not answers(given):
            raise RaydpoError(
                f"no Ray cluster answers at {given} ({source}): start it (`ray start --head`), "
                f"or {cure} to run on a local instance"
            )
        return given
    from ray._common.utils import get_ray_address_file
    from ray._private.utils import read_ray_address

    recorded, where = read_ray_address(), get_ray_address_file(None)
    if recorded is not None and answers(recorded):
        return recorded
    if given == "auto":  # asked for a running cluster: there is none to join
        state = f"{recorded}, which does not answer" if recorded else "nothing"
        raise RaydpoError(
            f"{source} auto: {where} records {state}; start a cluster (`ray start --head`; `ray stop` "
            "clears a dead record), or pass its address"
        )
    if recorded is not None:
        logger.warning(
            "the Ray cluster recorded in %s (%s) does not answer (a head stopped without `ray stop`, "
            "which clears the record): starting a local Ray instance",
            where,
            recorded,
        )
    return None


def answers(address: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether something accepts connections at `address` (host:port) within `timeout` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RaydpoError(f"{address!r} is not a Ray address (host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _start_local(log_to_driver: bool, options: dict[str, Any]) -> str:
    """Start a local instance whose GCS port is chosen here, so that its address is known in time to
    pin it in the job's runtime env (Ray reads RAY_GCS_SERVER_PORT when it starts a head).

    The port is free when chosen and bound by the GCS a moment later; should another process take it
    in between, the GCS fails to start (after Ray's 40 s wait) and one more port is tried."""
    import ray

    if GCS_PORT in os.environ:  # the user's choice: used as it is
        return _start_on(os.environ[GCS_PORT], log_to_driver, options)
    port = free_port()
    try:
        return _start_on(port, log_to_driver, options)
    except RuntimeError as error:
        if "Failed to start GCS" not in str(error):
            raise
    ray.shutdown()
    logger.warning("Ray's GCS could not bind port %d, taken meanwhile: starting on another", port)
    return _start_on(free_port(), log_to_driver, options)


def _start_on(port: int | str, log_to_driver: bool, options: dict[str, Any]) -> str:
    import ray

    chosen = GCS_PORT not in os.environ
    os.environ[GCS_PORT] = str(port)
    try:
        address = f"{ray.util.get_node_ip_address()}:{port}"
        ray.init(address="local", log_to_driver=log_to_driver, runtime_env=_pinned_env(address), **options)
    finally:
        if chosen:
            del os.environ[GCS_PORT]
    return ray.get_runtime_context().gcs_address


# `ray start`'s workers take ports from 10002-19999 (`--min-worker-port`, `--max-worker-port`), other
# processes and outgoing connections theirs from the kernel's ephemeral range (from 32768 on Linux): a
# port between them is taken by neither while the GCS starts.
GCS_PORTS = (20000, 32768)


def free_port() -> int:
    """A TCP port free now, from GCS_PORTS where one is free there (else one the kernel picks)."""
    import random

    for _ in range(64):
        port = random.randrange(*GCS_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _pinned_env(address: str) -> dict[str, Any]:
    return {"env_vars": {RAY_ADDRESS: address}}


def worker_env(env_vars: dict[str, str] | None = None) -> dict[str, Any] | None:
    """A runtime env for Ray workers and actors: `env_vars`, and this process's fault-drill variables
    (checked here, before any worker starts)."""
    env = {**fault_env(), **(env_vars or {})}
    return {"env_vars": env} if env else None


# A process that Ray gives no GPU sees none. Ray no longer clears CUDA_VISIBLE_DEVICES for num_gpus=0
# (ray-project/ray#54868), so on a GPU node a CPU scorer or training worker would see every GPU: torch
# would score on cuda:0 beside the actors Ray placed there, and DeepSpeed would take the GPU as its
# accelerator while the batches stay on the CPU.
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
    matrix product, while processes split the batch and then also exchange weights and gradients:
    measured on 2 cores, one worker of 2 threads took 2.4 s a step where 2 workers of 1 thread took
    3.7 s (docs/benchmarks.md)."""
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


# ---- every node sees the same paths -------------------------------------------------------------------


def other_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the cluster other than the one this process runs on."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [node for node in ray.nodes() if node["Alive"] and node["NodeID"] != here]


def on_other_nodes(function: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """`function(*args)` run once on every other alive node: {"ip (node id)": its result}."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(function)
    pending = {
        f"{node['NodeManagerAddress']} ({node['NodeID'][:12]})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(*args)
        for node in other_nodes()
    }
    try:
        return dict(zip(pending, ray.get(list(pending.values()), timeout=NODE_SECONDS), strict=True))
    except GetTimeoutError:
        raise RaydpoError(
            f"a task on each node ({', '.join(pending)}) did not answer within {NODE_SECONDS:g} s"
        ) from None
