"""Data sources: a row count and row-range reads, checked before any work starts.

A source is what the shards read from. Each shard is a contiguous row range; a worker
reads its own range once, into memory, and draws its minibatches from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np


class DataError(ValueError):
    """The data cannot be used as given."""


@runtime_checkable
class Source(Protocol):
    """Row-aligned named arrays that can be read by row range."""

    @property
    def n_rows(self) -> int: ...

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> (dtype, trailing shape), without reading the rows."""
        ...

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


def check_array(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 0:
        raise DataError(f"data array {name!r} is a scalar; arrays need a leading row axis")
    if arr.shape[0] == 0:
        raise DataError(f"data array {name!r} has no rows")
    if arr.dtype == bool:
        arr = arr.astype(np.int8)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"data array {name!r} has non-numeric dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64, copy=False)
        finite = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise DataError(f"data array {name!r} has NaN or inf at row {row}")
    return arr


class ArraySource:
    """In-memory arrays (a dict of numpy arrays sharing their leading axis).

    Examples
    --------
    >>> src = ArraySource({"x": np.arange(6.0), "y": np.ones((6, 2))})
    >>> src.n_rows, src.read(2, 4)["x"].tolist()
    (6, [2.0, 3.0])
    """

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        if not isinstance(arrays, Mapping):
            raise TypeError(f"data must be a mapping of names to arrays, got {type(arrays).__name__}")
        if not arrays:
            raise DataError("data is empty: give at least one array")
        checked = {}
        for name, value in arrays.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise DataError(f"data array name {name!r} must be a valid identifier")
            checked[name] = check_array(name, np.asarray(value))
        rows = {name: a.shape[0] for name, a in checked.items()}
        if len(set(rows.values())) != 1:
            raise DataError(f"data arrays have different row counts: {rows}")
        if next(iter(rows.values())) == 0:
            raise DataError("data has no rows")
        self.arrays = checked

    @property
    def n_rows(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (str(v.dtype), tuple(v.shape[1:])) for k, v in self.arrays.items()}

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.arrays.items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "arrays", "n_rows": self.n_rows,
                "arrays": {k: [d, list(s)] for k, (d, s) in self.schema().items()}}


def as_source(data: Any) -> Source:
    """A :class:`Source` from a source, or a mapping of arrays."""
    if isinstance(data, Source):
        return data
    return ArraySource(data)


def shard_bounds(n_rows: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges of near-equal size (the first ones one row longer)."""
    base, extra = divmod(n_rows, num_workers)
    bounds, start = [], 0
    for k in range(num_workers):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
