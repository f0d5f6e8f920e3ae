"""The precompute's progress line: rows tokenized, scored and written, rejects, pairs/s, tokens/s.

The tokenizing tasks, the scorer actors and the Parquet writers add their counts to one small actor
(`Tally`, no CPU reserved) as they finish each batch, fire and forget; a thread of the driver reads it and
prints one line per split, redrawn in place on a terminal and every PLAIN_SECONDS elsewhere
(`console.status`). The counts are progress only: a retried batch counts twice here, never in the
manifest, which is built from the files written.

    precompute train  0:01:23  1,536 rows read  1,024 scored  1,000 written  12 rejected  12.3 pairs/s
"""

from __future__ import annotations

import threading
import time
from typing import Any

from raydpo import console

TERMINAL_SECONDS = 0.5
PLAIN_SECONDS = 30.0


class Tally:
    """Counts added by the pipeline's tasks and actors."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + int(value)

    def read(self) -> dict[str, int]:
        return dict(self.counts)


def report(tally, **counts: int) -> None:
    """Add COUNTS to TALLY (an actor handle, or None when progress is not tracked), without waiting."""
    if tally is not None:
        tally.add.remote(counts)


class Progress:
    """The live line of one split's precompute, from `__enter__` to `__exit__` (which prints it final).

    `tally` is the handle the pipeline's functions report to; `total` the input's row count where it is
    known without reading the data, for a share done and an ETA."""

    def __init__(self, label: str, total: int | None = None) -> None:
        import ray

        self.label, self.total = label, total
        self.counts: dict[str, int] = {}  # the final counts, once the block has ended
        self.tally = ray.remote(num_cpus=0)(Tally).remote()
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        self.stop.set()
        self.thread.join()
        counts = self._read(timeout=5.0)
        if counts is not None:
            self.counts = counts
            console.status(self.line(counts, time.monotonic() - self.started), final=True)
        ray.kill(self.tally)

    def _run(self) -> None:
        every = TERMINAL_SECONDS if console.terminal() else PLAIN_SECONDS
        while not self.stop.wait(every):
            counts = self._read(timeout=every)
            if counts is not None:
                console.status(self.line(counts, time.monotonic() - self.started))

    def _read(self, timeout: float) -> dict[str, int] | None:
        import ray

        try:
            return ray.get(self.tally.read.remote(), timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return None

    def line(self, counts: dict[str, int], seconds: float) -> str:
        read, scored = counts.get("read", 0), counts.get("scored", 0)
        rejected, done = counts.get("rejected", 0), counts.get("done", 0)
        parts = [f"precompute {self.label}", _clock(seconds), f"{read:,} rows read"]
        if done:
            parts.append(f"{done:,} kept from an earlier run")
        parts += [f"{scored:,} scored", f"{counts.get('written', 0):,} written", f"{rejected:,} rejected"]
        if counts.get("restarts"):
            parts.append(restarts_phrase(counts["restarts"]))
        rate = scored / seconds if seconds > 0 else 0.0
        parts += [f"{rate:.1f} pairs/s", f"{counts.get('tokens', 0) / max(seconds, 1e-9):,.0f} tokens/s"]
        finished = scored + rejected + done
        if self.total and rate > 0 and finished < self.total:
            parts.append(f"{finished / self.total:.0%}, ETA {_clock((self.total - finished) / rate)}")
        return "  ".join(parts)


def restarts_phrase(count: int) -> str:
    """The restart count as the progress line and the summary say it: "1 scorer restart", "2 ..."."""
    return f"{count} scorer restart{'s' if count != 1 else ''}"


def _clock(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"
