"""The exception types users see, and the one way an exception becomes the single line they read.

Bad input raises `RaydpoError` (the CLI prints it as one line and exits with code 2); a stage that
started and failed raises `StageFailed` (`TrainingFailed`, `PrecomputeFailed`: exit code 1).
`console.run_command` is where entry points turn them into that line and code.
"""

from __future__ import annotations

import re

# A line of a traceback that names the exception raised: `raydpo.train_stage.checks.SomeError: message`.
_RAISED_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*: ")
_RAYDPO_ERROR_LINE = re.compile(r"^raydpo\.errors\.RaydpoError: (.*)$", re.MULTILINE)


class RaydpoError(ValueError):
    """A problem with the user's input or settings, reported before (or instead of) heavy work."""


class StageFailed(RuntimeError):
    """A stage started and did not finish; the CLI exits with 1."""


class TrainingFailed(StageFailed):
    """Training started but did not finish (a worker failed beyond max_failures); the CLI exits with 1."""


class PrecomputeFailed(StageFailed):
    """The precompute started and did not finish (a scorer failed beyond its restarts)."""


def raised_within(error: BaseException) -> RaydpoError | None:
    """The `RaydpoError` a check raised in a Ray task or actor, which reached the driver wrapped by Ray (as
    the cause of a task's error, or as the text of an actor's creation error); None if there is none."""
    seen = 0
    while error is not None and seen < 8:
        found = _RAYDPO_ERROR_LINE.findall(str(error))  # in the text of a remote traceback
        if found:
            return RaydpoError(found[-1].strip())
        if isinstance(error, RaydpoError):  # raised here, in the driver
            return error
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return None


# what usually ends a Ray process from outside, for a line that names a process that died
DEATH_CAUSES = (
    "the usual causes are the OOM killer, `ray stop --force` and a crash (the full log has Ray's account)"
)


def process_died(error: BaseException) -> str | None:
    """Where and how a Ray actor's process died, for an actor that died of its process exiting (killed,
    out of memory, crashed) rather than of an exception: "pid 4106 on 10.0.0.5: <Ray's exit detail>".
    None for any other error. Ray gives the facts only as text (`ActorDiedError`'s message)."""
    from ray.exceptions import ActorDiedError

    for _ in range(8):
        if error is None or isinstance(error, ActorDiedError):
            break
        # a task's error wraps its cause; Ray Train's failed health check, the death it found
        error = (
            getattr(error, "cause", None) or getattr(error, "health_check_failure", None) or error.__cause__
        )
    text = " ".join(str(error).split()) if isinstance(error, ActorDiedError) else ""
    detail = re.search(r"Worker exit detail: (.*?)\.?(?: Some common causes|$)", text)
    if detail is None:
        return None
    pid, node = re.search(r"\bpid: (\d+)", text), re.search(r"\bip: (\S+)", text)
    where = [f"pid {pid.group(1)}"] if pid else []
    where += [node.group(1)] if node else []
    return f"{' on '.join(where)}: {detail.group(1)}" if where else detail.group(1)


def one_line(error: BaseException, limit: int | None = 300) -> str:
    """The one line users see for an exception, at most `limit` characters.

    An error Ray raised around another stands for the one it wraps: a task's error carries the original
    as `cause`, Ray Data chains it as `__cause__`. A message holding tracebacks (a worker group's report)
    gives the last line that names a raised exception. Whitespace, newlines included, collapses to single
    spaces; an empty message gives the exception's type name.
    """
    for _ in range(8):  # a bounded walk down the chain of wrappers
        inner = getattr(error, "cause", None)
        if inner is None and type(error).__module__.startswith("ray."):
            inner = error.__cause__
        if not isinstance(inner, BaseException) or not str(inner).strip():
            break
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED_LINE.match(line)] if len(lines) > 1 else []
    text = raised[-1] if raised else " ".join(" ".join(lines).split())
    return text[:limit] or type(error).__name__
