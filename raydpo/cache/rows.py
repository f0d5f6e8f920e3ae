"""Sets of input rows as sorted ranges: what a part file holds, what a resumed run skips, and the proof
that a finished split holds every input row exactly once.

Rows are numbered by their position in the input (`source_row`, see `raydpo.sources.SOURCE_ROW`). Scored
in input order, the rows of a part file are a few runs of consecutive numbers, so a file's ranges fit in
its Parquet footer and a split's ranges are about one per input file, whatever the number of rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

ROWS_METADATA = b"raydpo.source_rows"  # a part file's RowRanges, as JSON, in its footer


@dataclass(frozen=True)
class RowRanges:
    """Disjoint half-open ranges [start, stop) of row numbers, sorted; `overlap` counts the rows that
    were in more than one of the sets merged into it (0 for a set of distinct rows)."""

    starts: np.ndarray
    stops: np.ndarray
    overlap: int = 0

    @classmethod
    def empty(cls) -> RowRanges:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def of(cls, rows) -> RowRanges:
        """The ranges of ROWS (any order; repeated numbers count in `overlap`)."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return cls.empty()
        repeats = int(np.count_nonzero(np.diff(rows) == 0))
        rows = np.unique(rows)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = rows[np.concatenate([[0], breaks])]
        stops = rows[np.concatenate([breaks - 1, [len(rows) - 1]])] + 1
        return cls(starts, stops, repeats)

    @classmethod
    def union(cls, parts: list[RowRanges]) -> RowRanges:
        """The ranges of all PARTS together; rows in more than one part add to `overlap`."""
        parts = [part for part in parts if len(part)]
        if not parts:
            return cls.empty()
        starts = np.concatenate([part.starts for part in parts])
        stops = np.concatenate([part.stops for part in parts])
        order = np.argsort(starts, kind="stable")
        starts, stops = starts[order], stops[order]
        # the furthest stop so far, before each range: a range starting below it overlaps the ones before
        reach = np.maximum.accumulate(stops)
        before = np.concatenate([[starts[0]], reach[:-1]])
        overlap = int(np.clip(np.minimum(before, stops) - starts, 0, None).sum())
        new = starts > before  # touching ranges merge too
        new[0] = True
        group = np.cumsum(new) - 1
        merged_stops = np.zeros(group[-1] + 1, np.int64)
        np.maximum.at(merged_stops, group, stops)
        return cls(starts[new], merged_stops, overlap + sum(part.overlap for part in parts))

    @property
    def rows(self) -> int:
        """How many distinct rows the ranges hold."""
        return int((self.stops - self.starts).sum())

    def __len__(self) -> int:
        return len(self.starts)

    def contains(self, rows) -> np.ndarray:
        """A boolean mask: which of ROWS are in the ranges."""
        rows = np.asarray(rows, dtype=np.int64)
        index = np.searchsorted(self.starts, rows, side="right") - 1
        inside = index >= 0
        inside[inside] = rows[inside] < self.stops[index[inside]]
        return inside

    def to_json(self) -> str:
        return json.dumps(np.stack([self.starts, self.stops], axis=1).tolist())

    @classmethod
    def from_json(cls, text: str | bytes) -> RowRanges:
        pairs = np.asarray(json.loads(text), dtype=np.int64).reshape(-1, 2)
        return cls(pairs[:, 0].copy(), pairs[:, 1].copy())
