"""Joining Ray, the environment of Ray workers, and a task on each other node (`on_other_nodes`).

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
from collections.abc import Callable
from typing import Any

from raydpo.errors import RaydpoError
from raydpo.faults import fault_env

logger = logging.getLogger(__name__)

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
