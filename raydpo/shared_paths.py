"""Paths every node must see: the local outputs a stage writes and the inputs it reads.

On a cluster of several nodes, a local path is the same for all of them only on a filesystem every node
mounts at the same place: a model that rank 0 publishes to its own disk never reaches the driver, the
SQLite MLflow store rank 0 logs to would be another file, and Ray Train notices a node-local
storage_path only when a remote worker uploads its first checkpoint. The driver leaves a marker file
in each local output directory for the stage's life. A task on each node alive at the start looks for
the markers and the inputs; on an autoscaling cluster, nodes that join later are checked where the
work runs: each writer and each training rank looks for the markers before its first write.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from raydpo.cluster import on_other_nodes, other_nodes
from raydpo.errors import RaydpoError

# marker file -> [what, path, made], e.g. ["the output", "/shared/run", ""]; made: "made" where the check
# made the directory, which `remove_markers` then removes again if nothing else was written there
Markers = dict[str, list[str]]


def check_shared_paths(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> Markers:
    """Leave a marker in each local output directory and, with other nodes alive, stop before any work
    if one of them cannot see a marker or an input, naming the path and the node. Returns the markers,
    for the stage's writers (`check_visible`) until the stage removes them (`remove_markers`)."""
    outputs, inputs = _local_paths(outputs), _local_paths(inputs)
    inputs = {what: path for what, path in inputs.items() if os.path.exists(path)}  # else a hub id
    markers: Markers = {}
    for what, path in outputs.items():
        if os.path.exists(path) and not os.path.isdir(path):
            continue  # a file: the stage refuses it with a line of its own
        made = "" if os.path.isdir(path) else "made"
        os.makedirs(path, exist_ok=True)
        marker = os.path.join(path, f".raydpo-shared-{uuid.uuid4().hex[:12]}")
        Path(marker).touch()
        markers[marker] = [what, path, made]
    looked_for = {path: [what, path] for what, path in inputs.items()} | markers
    try:
        missing = on_other_nodes(missing_paths, list(looked_for)) if looked_for and other_nodes() else {}
        for node, paths in missing.items():
            if paths:
                raise RaydpoError(not_visible(*looked_for[paths[0]][:2], node))
    except BaseException:
        remove_markers(markers)
        raise
    return markers


def check_visible(markers: Markers) -> None:
    """In a writer or training rank, before its first write: this node sees every output's marker."""
    import ray

    missing = missing_paths(list(markers))
    if missing:
        context = ray.get_runtime_context()
        node = f"{ray.util.get_node_ip_address()} ({context.get_node_id()[:12]})"
        raise RaydpoError(not_visible(*markers[missing[0]][:2], node))


def remove_markers(markers: Markers) -> None:
    """Remove the markers, and a directory the check made where nothing else was written."""
    for marker, (_, path, made) in markers.items():
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
        if made:
            with contextlib.suppress(OSError):  # not empty: the stage wrote there
                os.rmdir(path)


def not_visible(what: str, path: str, node: str) -> str:
    return (
        f"{what} {path} is not visible from node {node}: with more than one node, every node must see it: "
        "use a filesystem all nodes mount at the same path, or an s3:// URI (for MLflow, a tracking server "
        "through --mlflow-tracking-uri)"
    )


def missing_paths(paths: list[str]) -> list[str]:
    """Of `paths`, those that do not exist on the node this runs on."""
    return [path for path in paths if not os.path.exists(path)]


def _local_paths(paths: dict[str, str | None]) -> dict[str, str]:
    """The entries that are local paths (file:// included), as absolute paths."""
    return {
        what: os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        for what, path in paths.items()
        if path and ("://" not in path or path.startswith("file://"))
    }
