"""Fault injection for reliability drills: a named point in the code exits or stalls, once.

Set in the environment of the processes that reach the point (raydpo forwards `RAYDPO_*` variables to
its Ray workers and actors):

    RAYDPO_FAULT=<point>:<n>:<action>   at the n-th time this process reaches <point>
    RAYDPO_FAULT_DIR=<dir>              where the fault leaves its marker, `<point>.fired`

`exit` ends the process at once, as SIGKILL would (no cleanup, no exception); `stall` writes the
process id into the marker and waits to be killed from outside. The marker is created atomically
before acting, so a fault fires once per marker directory: the restarted process runs normally.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

FAULT_ENV = "RAYDPO_FAULT"
FAULT_DIR_ENV = "RAYDPO_FAULT_DIR"
ACTIONS = ("exit", "stall")

_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Mark a point where a drill may kill or stall this process; a no-op unless `RAYDPO_FAULT` names it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith(f"{name}:"):
        return
    point, count, action = spec.rsplit(":", 2)
    if point != name or action not in ACTIONS:
        return
    _hits[name] += 1
    if _hits[name] != int(count):
        return
    marker = Path(os.environ[FAULT_DIR_ENV]) / f"{name}.fired"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # fired already, in an earlier incarnation of this process
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    logger.warning("fault injection: %s (pid %d) at %s", action, os.getpid(), name)
    if action == "exit":
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
