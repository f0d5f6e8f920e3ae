"""Worker failures in words: the one line of a failed run, and a line and MLflow tags for each failure.

Ray Train reports a failed worker group as one error per rank. The rank that matters is the one whose
process died (the others then fail at their next collective), else one that raised an error of its
own, else the first. `FailureRecorder` runs on Ray Train's controller: each failure, retried or not,
gets a console line and is counted on the MLflow run, where users look when a run took longer than it
should have.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ray.train import UserCallback

from raydpo.errors import DEATH_CAUSES, one_line, process_died

# the errors of a rank whose peer failed: its collective lost the peer
_PEER_LOST = re.compile(
    r"DistBackendError|DistNetworkError|[Gg]loo|NCCL|Connection closed by peer|Broken pipe"
)


def describe(failures: Mapping[int, BaseException], limit: int = 800) -> str:
    """The failure of a worker group in one line, from Ray Train's errors per rank."""
    for rank, failure in sorted(failures.items()):
        died = process_died(failure)
        if died:
            return f"the process of worker rank {rank} died ({died})"
    raised = {rank: one_line(failure, limit=limit) for rank, failure in sorted(failures.items())}
    own = [rank for rank, line in raised.items() if not _PEER_LOST.search(line)]
    rank = own[0] if own else min(raised)
    return f"worker rank {rank} failed: {raised[rank]}"


def failed_run(error: BaseException, max_failures: int) -> str:
    """The one line of a run that failed: its worker group's failure beyond `max_failures`, or another
    error of Ray Train (the controller's, a start-up timeout)."""
    failures = getattr(error, "worker_failures", None)  # Ray Train's WorkerGroupError
    if not failures:
        return one_line(error, limit=1000)
    line = describe(failures)
    if not line.startswith("the process of"):  # an error a worker raised
        return line
    return f"{line}, and --max-failures {max_failures} allows no more restarts; {DEATH_CAUSES}"


class FailureRecorder(UserCallback):
    """On Ray Train's controller: each worker-group failure as a console line, and on the MLflow run as
    tags (`raydpo.worker_failures`, a count over every attempt of the run, and `raydpo.last_failure`)."""

    def __init__(self, tracking_uri: str, run_id: str, max_failures: int) -> None:
        self.tracking_uri, self.run_id, self.max_failures = tracking_uri, run_id, max_failures
        self.failures = 0  # in this attempt, as Ray Train counts them against max_failures

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        from raydpo.tracking import record_worker_failure

        self.failures += 1
        line = describe(worker_exceptions)
        then = (
            "the workers restart from the latest checkpoint"
            if self.failures <= self.max_failures
            else f"more than --max-failures {self.max_failures}: the run stops"
        )
        print(f"raydpo: worker failure {self.failures}: {line}; {then}", flush=True)
        try:
            record_worker_failure(self.tracking_uri, self.run_id, line)
        except Exception as error:  # the run goes on without the tags
            print(f"raydpo: the failure could not be recorded in MLflow: {one_line(error)}", flush=True)
