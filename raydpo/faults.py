"""Fault injection for reliability drills: a named point in the code exits or stalls, once.

Set in the environment of the processes that reach the point (`cluster.worker_env` forwards these two
variables to raydpo's Ray workers and actors):

    RAYDPO_FAULT=<point>:<n>:<action>[@<rank>]   at the n-th time this process reaches <point>; with a
                                                 rank, only in the Ray Train worker of that world rank
    RAYDPO_FAULT_DIR=<dir>                       where the fault leaves its marker, `<point>.fired`

`exit` ends the process at once, as SIGKILL would (no cleanup, no exception); `stall` writes the
process id into the marker and waits to be killed from outside. The marker is created atomically
before acting, so a fault fires once per marker directory: the restarted process runs normally.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from raydpo.errors import RaydpoError

logger = logging.getLogger(__name__)

FAULT_ENV = "RAYDPO_FAULT"
FAULT_DIR_ENV = "RAYDPO_FAULT_DIR"
# where each training worker appends the pair ids of every micro-batch it trains on, a JSON line each
# (`pairs-rank<r>.jsonl`): the record a drill checks data order against
PAIR_TRACE_ENV = "RAYDPO_PAIR_TRACE_DIR"
ACTIONS = ("exit", "stall")
_SPEC = re.compile(r"(?P<point>[\w.]+):(?P<count>[1-9]\d*):(?P<action>\w+)(@(?P<rank>\d+))?")

_hits: Counter[str] = Counter()


@dataclass(frozen=True)
class Fault:
    """An armed fault: the point, the visit that fires, the action and, for one worker only, its rank."""

    point: str
    count: int
    action: str
    directory: Path
    rank: int | None = None


def armed() -> Fault | None:
    """The fault this process's environment arms, or None; a malformed spec is an error, not a no-op."""
    return _parse(os.environ.get(FAULT_ENV), os.environ.get(FAULT_DIR_ENV))


@functools.lru_cache(maxsize=8)
def _parse(spec: str | None, directory: str | None) -> Fault | None:
    if not spec:
        return None
    match = _SPEC.fullmatch(spec)
    if match is None or match["action"] not in ACTIONS:
        raise RaydpoError(
            f"{FAULT_ENV}={spec!r}: expected <point>:<n>:<action>[@<rank>] with n >= 1 and action "
            f"{' or '.join(ACTIONS)}"
        )
    if not directory:
        raise RaydpoError(f"{FAULT_ENV} is set but {FAULT_DIR_ENV}, where its marker goes, is not")
    rank = match["rank"]
    return Fault(
        match["point"],
        int(match["count"]),
        match["action"],
        Path(directory),
        None if rank is None else int(rank),
    )


def fault_env() -> dict[str, str]:
    """The fault variables to forward to workers and actors, checked once here, before any starts."""
    armed()
    names = (FAULT_ENV, FAULT_DIR_ENV, PAIR_TRACE_ENV)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def trace_pairs(rank: int, step: int, epoch: int, pair_ids) -> None:
    """Append a trained micro-batch's pair ids to this rank's trace; a no-op unless PAIR_TRACE_ENV is set."""
    directory = os.environ.get(PAIR_TRACE_ENV)
    if directory:
        import json

        line = json.dumps({"step": step, "epoch": epoch, "pairs": [str(pair) for pair in pair_ids]})
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(Path(directory) / f"pairs-rank{rank}.jsonl", "a", encoding="utf-8") as trace:
            trace.write(line + "\n")


def fault_point(name: str, rank: int | None = None) -> None:
    """Mark a point where a drill may kill or stall this process (the Ray Train worker of world rank
    `rank`, where it is one); a no-op unless `RAYDPO_FAULT` names the point (and the rank)."""
    fault = armed()
    if fault is None or fault.point != name or (fault.rank is not None and fault.rank != rank):
        return
    _hits[name] += 1
    if _hits[name] != fault.count:
        return
    marker = fault.directory / f"{name}.fired"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # fired already, in an earlier incarnation of this process
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    logger.warning("fault injection: %s (pid %d) at %s", fault.action, os.getpid(), name)
    if fault.action == "exit":
        os._exit(1)
    while True:  # stall: the drill kills this process
        time.sleep(1)


def fired(directory: str | Path, name: str) -> int | None:
    """The pid that fired fault `name` under `directory`, or None if it has not fired."""
    marker = Path(directory) / f"{name}.fired"
    try:
        return int(marker.read_text())
    except (FileNotFoundError, ValueError):  # not yet, or being written
        return None
