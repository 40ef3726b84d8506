"""Rows split by group for local variables: every row of a group in one shard.

Rows in memory are ordered by the group column (stably: a group's rows keep their order); a
Zarr store's rows must be ordered by it already (the driver reads that one column, never the
rows: each worker still reads its own range). The shards are contiguous ranges of whole
groups, cut where the rows are closest to equal.
"""

from __future__ import annotations

import numpy as np

from distvi.data import ArraySource, DataError
from distvi.local_terms import ROW_COLUMN


class GroupedRanges:
    """A source whose rows are ordered by ``column``, with the shards' row ranges fixed at
    group boundaries (``shard_bounds``); the workers read their ranges from it."""

    def __init__(self, source, column: str, n_groups: int, shard_bounds: list[tuple[int, int]]) -> None:
        self.source, self.column, self.n_groups = source, column, n_groups
        self.shard_bounds = list(shard_bounds)

    n_rows = property(lambda self: self.source.n_rows)

    def schema(self):
        return self.source.schema()

    def read(self, start: int, stop: int):
        return self.source.read(start, stop)

    def describe(self) -> dict:
        return {**self.source.describe(), "grouped_by": self.column, "groups": self.n_groups}


class GroupedSource(ArraySource):
    """In-memory rows ordered by ``column``, with the shards' row ranges fixed at group
    boundaries (``shard_bounds``) for ``len(shard_bounds)`` workers."""

    def __init__(self, arrays, column: str, n_groups: int, shard_bounds: list[tuple[int, int]]) -> None:
        super().__init__(arrays)
        self.column, self.n_groups = column, n_groups
        self.shard_bounds = list(shard_bounds)

    def describe(self) -> dict:
        return {**super().describe(), "grouped_by": self.column, "groups": self.n_groups}


def group_cuts(counts: np.ndarray, num_workers: int) -> list[int]:
    """Group indices ``0 = c_0 < c_1 < ... < c_W = groups``: shard ``k`` holds the groups
    ``c_k .. c_{k+1} - 1``, each cut at the group boundary whose row count is nearest
    ``k * N / W``."""
    n_groups = len(counts)
    ends = np.cumsum(counts)  # rows up to and including each group
    total = int(ends[-1])
    cuts = [0]
    for k in range(1, num_workers):
        target = k * total / num_workers
        g = int(np.searchsorted(ends, target))  # first group whose end reaches the target
        if g > 0 and abs(ends[g - 1] - target) <= abs(ends[min(g, n_groups - 1)] - target):
            g -= 1
        # at least one group per shard on either side
        g = min(max(g + 1, cuts[-1] + 1), n_groups - (num_workers - k))
        cuts.append(g)
    cuts.append(n_groups)
    return cuts


def group_source(source, locals_, num_workers: int) -> GroupedSource:
    """``source``'s rows ordered by the local variables' column and split into
    ``num_workers`` shards of whole groups. Bad group indices are refused first, naming the
    column, before any row is copied."""
    columns = sorted({v.column for v in locals_})
    if len(columns) > 1:
        what = [c if c != ROW_COLUMN else "the rows (a per-row variable)" for c in columns]
        raise ValueError(f"local variables {[v.rv_name for v in locals_]} are indexed by "
                         f"different columns {what}; the shards can follow one grouping: "
                         "make all but one grouping's variables global")
    column = columns[0]
    sizes = {v.n_groups for v in locals_}
    if len(sizes) > 1:
        raise ValueError(f"local variables {[v.rv_name for v in locals_]} of column {column!r} "
                         f"have different numbers of groups {sorted(sizes)}")
    n_groups = sizes.pop()
    in_memory = isinstance(source, ArraySource)
    if column == ROW_COLUMN and not in_memory:
        raise DataError(f"per-row local variables {[v.rv_name for v in locals_]} need the rows "
                        "in memory (a mapping of arrays) for now", column)
    if not in_memory and not hasattr(source, "read_column"):
        raise DataError(f"local variables need the rows in memory or in a Zarr store ordered "
                        f"by {column!r}; a {type(source).__name__} cannot be split by group yet",
                        column)
    if in_memory:
        rows = source.read(0, source.n_rows)
        if column == ROW_COLUMN:  # per-row local variables: each row its own group, in order
            rows[ROW_COLUMN] = np.arange(source.n_rows, dtype=np.int64)
        g = np.asarray(rows[column])
    else:
        g = source.read_column(column)
    names = ", ".join(v.rv_name for v in locals_)
    if g.ndim != 1:
        raise DataError(f"column {column!r} (the groups of {names}) must be one index per row, "
                        f"got shape {g.shape}", column)
    bad = (g < 0) | (g >= n_groups)
    if bad.any():
        raise DataError(f"column {column!r} holds {int(bad.sum())} group indices outside "
                        f"0..{n_groups - 1} (the first {int(g[bad][0])} at row "
                        f"{int(np.flatnonzero(bad)[0])}); {names} has {n_groups} groups", column)
    counts = np.bincount(g, minlength=n_groups)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"{empty.size} of the {n_groups} groups of {names} have no rows (the first: "
                        f"group {int(empty[0])}); a group without data has nothing to fit: leave "
                        "it out of the variable's coords or size", column)
    if n_groups < num_workers:
        raise ValueError(f"num_workers={num_workers} is more than the {n_groups} groups of {names}; "
                         "each shard holds whole groups")
    cuts = group_cuts(counts, num_workers)
    starts = np.concatenate([[0], np.cumsum(counts)])
    bounds = [(int(starts[a]), int(starts[b])) for a, b in zip(cuts[:-1], cuts[1:])]
    if not in_memory:
        if np.any(np.diff(g) < 0):
            first = int(np.flatnonzero(np.diff(g) < 0)[0]) + 1
            raise DataError(f"the rows of {source.describe().get('path', 'the store')!r} are not "
                            f"ordered by column {column!r} (row {first} has group {int(g[first])} "
                            f"after {int(g[first - 1])}); local variables split a store's rows by "
                            "group where they are: write it ordered by that column (e.g. rows "
                            "taken in np.argsort(column, kind='stable') order)", column)
        return GroupedRanges(source, column, n_groups, bounds)
    order = np.argsort(g, kind="stable")
    return GroupedSource({k: np.asarray(v)[order] for k, v in rows.items()}, column, n_groups, bounds)
