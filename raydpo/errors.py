"""The exception types users see, and the one way an exception becomes the single line they read.

Bad input raises `RaydpoError` (the CLI prints it as one line and exits with code 2); a run that started
and failed raises `TrainingFailed` (exit code 1). `console.run_command` is where entry points turn them
into that line and code.
"""

from __future__ import annotations

import re

# A line of a traceback that names the exception raised: `raydpo.train_stage.checks.SomeError: message`.
_RAISED_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*: ")


class RaydpoError(ValueError):
    """A problem with the user's input or settings, reported before (or instead of) heavy work."""


class TrainingFailed(RuntimeError):
    """Training started but did not finish (a worker failed beyond max_failures); the CLI exits with 1."""


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
