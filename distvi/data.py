"""Data sources: a row count and row-range reads, checked before any work starts.

A source is what the shards read from. Each shard is a contiguous row range; a worker
reads its own range once, into memory, and draws its minibatches from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np


class DataError(ValueError):
    """The data cannot be used as given. ``field`` names the source argument at fault
    (``"path"``, ``"arrays"``, ``"columns"``) when there is one: a config's ``data.<field>``."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype distvi keeps: bool as int8, floats other than float32 as float64."""
    dtype = np.dtype(dtype)
    if dtype == bool:
        return np.dtype(np.int8)
    if np.issubdtype(dtype, np.floating) and dtype != np.float32:
        return np.dtype(np.float64)
    return dtype


def _check_rows(rows: dict[str, int]) -> None:
    if len(set(rows.values())) != 1:
        raise DataError(f"data arrays have different row counts: {rows}")
    if next(iter(rows.values())) == 0:
        raise DataError("data has no rows")


def check_array(name: str, arr: np.ndarray, row_offset: int = 0) -> np.ndarray:
    if arr.ndim == 0:
        raise DataError(f"data array {name!r} is a scalar; arrays need a leading row axis")
    if arr.shape[0] == 0:
        raise DataError(f"data array {name!r} has no rows")
    _check_dtype(name, arr.dtype)
    arr = arr.astype(stored_dtype(arr.dtype), copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise DataError(f"data array {name!r} has NaN or inf at row {row + row_offset}")
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
            try:
                value = np.asarray(value)
            except (TypeError, ValueError) as err:  # ragged lists and the like
                raise DataError(f"data array {name!r} is not a rectangular array: {err}") from None
            checked[name] = check_array(name, value)
        _check_rows({name: a.shape[0] for name, a in checked.items()})
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


class NoData:
    """The data of a model without observed variables (priors and potentials only): no rows,
    no shards; the model is fitted on the driver alone."""

    n_rows = 0

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {}

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "none", "n_rows": 0}


def split_batch(total: int, sizes: list[int]) -> list[int]:
    """``total`` minibatch rows per step split over shards of ``sizes`` rows, in proportion
    to their rows: each shard gets the floor of its share, and the rows left over go one
    each to the shards with the largest remainders (the lower rank first on a tie). Every
    shard gets at least one row and at most its own rows.

    >>> split_batch(10, [34, 33, 33])
    [4, 3, 3]
    """
    n = sum(sizes)
    if total >= n:
        return list(sizes)
    if total < len(sizes):
        raise DataError(f"the minibatch of {total} rows per step is smaller than the "
                        f"{len(sizes)} shards: every shard needs at least one row")
    shares = [total * s / n for s in sizes]
    out = [int(np.floor(x)) for x in shares]
    order = sorted(range(len(sizes)), key=lambda k: (-(shares[k] - out[k]), k))
    for k in order[: total - sum(out)]:
        out[k] += 1
    for k in range(len(out)):  # a shard of a few rows among large ones
        if out[k] == 0:
            donor = max(range(len(out)), key=lambda j: (out[j], -j))
            out[donor] -= 1
            out[k] = 1
    return out


def _column_mapping(columns: Any, available: list[str]) -> dict[str, str | list[str]]:
    """``columns`` of a :class:`ParquetSource` as ``{array: column | [columns]}``, checked by
    form (the names are checked against each file by the caller)."""
    if columns is None:
        return {c: c for c in available}
    if isinstance(columns, str):
        columns = [columns]
    if isinstance(columns, Mapping):
        mapping = dict(columns)
    elif isinstance(columns, list | tuple):
        bad = [c for c in columns if not isinstance(c, str)]
        if bad:
            raise DataError(f"Parquet columns must be column names (strings), got {bad[0]!r}",
                            "columns")
        mapping = {c: c for c in columns}
    else:
        raise DataError(f"Parquet columns must be a list of column names or a mapping "
                        f"{{array: column | [columns]}}, got {type(columns).__name__}", "columns")
    if not mapping:
        raise DataError("Parquet columns is empty: name at least one column", "columns")
    for name, cols in mapping.items():
        if not isinstance(name, str):
            raise DataError(f"array name {name!r} (in the Parquet columns) must be a string",
                            "columns")
        if isinstance(cols, list | tuple) and cols and all(isinstance(c, str) for c in cols):
            mapping[name] = list(cols)
        elif not isinstance(cols, str):
            raise DataError(f"Parquet columns for array {name!r} must be a column name or a "
                            f"non-empty list of column names, got {cols!r}", "columns")
    return mapping


def source_bounds(source: Source, num_workers: int) -> list[tuple[int, int]]:
    """The shards of a source: chunk-aligned where the source has chunks; fixed where the
    source fixed them (rows split by group for local variables)."""
    fixed = getattr(source, "shard_bounds", None)
    if fixed is not None:
        if len(fixed) != num_workers:
            raise ValueError(f"the rows were split by group for {len(fixed)} shards, not "
                             f"{num_workers}")
        return list(fixed)
    return shard_bounds(source.n_rows, num_workers, getattr(source, "chunk_rows", 1))


def as_source(data: Any) -> Source:
    """A :class:`Source` from a source, a mapping of arrays, or the path of a Zarr group."""
    if isinstance(data, Source):
        return data
    if isinstance(data, str) or hasattr(data, "__fspath__"):
        return ZarrSource(str(data))
    return ArraySource(data)


def shard_bounds(n_rows: int, num_workers: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges of near-equal size.

    With ``align`` > 1 (a Zarr store's chunk rows) the inner boundaries are multiples of it,
    so each worker reads whole chunks, as long as every shard still gets at least one chunk.
    """
    if align > 1 and n_rows // align >= num_workers:
        chunks = shard_bounds(-(-n_rows // align), num_workers)
        return [(a * align, min(b * align, n_rows)) for a, b in chunks]
    base, extra = divmod(n_rows, num_workers)
    bounds, start = [], 0
    for k in range(num_workers):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _check_dtype(name: str, dtype: np.dtype) -> None:
    # the same rule as check_array, from the dtype alone (sources check before reading)
    if not (dtype == bool or np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise DataError(f"data array {name!r} has non-numeric dtype {dtype}")


class ZarrSource:
    """A Zarr group whose arrays share their leading (row) axis.

    The driver reads only metadata; each worker reads its own row range (chunk-aligned
    shard boundaries read fastest).

    Parameters
    ----------
    path
        A local path or an fsspec URL of the group.
    arrays
        Names of the arrays to use (default: every array in the group).
    """

    def __init__(self, path: str, arrays: list[str] | None = None) -> None:
        import zarr

        self.path = str(path)
        try:
            group = zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for a missing or bad store
            raise DataError(f"cannot open Zarr group {self.path!r}: {err}", "path") from None
        names = sorted(k for k, _ in group.arrays()) if arrays is None else list(arrays)
        if not names:
            raise DataError(f"Zarr group {self.path!r} has no arrays", "path")
        meta = {}
        for name in names:
            if name not in group or not hasattr(group[name], "shape"):
                raise DataError(f"Zarr group {self.path!r} has no array {name!r}; it has "
                                f"{sorted(k for k, _ in group.arrays())}", "arrays")
            arr = group[name]
            if len(arr.shape) == 0:
                raise DataError(f"data array {name!r} is a scalar; arrays need a leading row axis")
            _check_dtype(name, np.dtype(arr.dtype))
            meta[name] = (np.dtype(arr.dtype), tuple(arr.shape), tuple(arr.chunks))
        _check_rows({k: v[1][0] for k, v in meta.items()})
        self._meta = meta

    @property
    def n_rows(self) -> int:
        return next(iter(self._meta.values()))[1][0]

    @property
    def chunk_rows(self) -> int:
        return max(v[2][0] for v in self._meta.values())

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (str(stored_dtype(dtype)), shape[1:]) for k, (dtype, shape, _) in self._meta.items()}

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        import zarr

        group = zarr.open_group(self.path, mode="r")
        out = {}
        for name in self._meta:
            arr = check_array(name, np.asarray(group[name][start:stop]), row_offset=start)
            out[name] = arr
        return out

    def read_column(self, name: str) -> np.ndarray:
        """One array's every row (for the driver, e.g. the group column of local variables)."""
        import zarr

        return check_array(name, np.asarray(zarr.open_group(self.path, mode="r")[name][...]))

    def describe(self) -> dict[str, Any]:
        return {"kind": "zarr", "path": self.path, "n_rows": self.n_rows,
                "arrays": {k: [d, list(s)] for k, (d, s) in self.schema().items()}}


class ParquetSource:
    """Parquet files read as columns -> arrays (through pyarrow).

    Parameters
    ----------
    paths
        One file or a list of files (rows are concatenated in order).
    columns
        ``None`` (every column, each its own array), a list of column names, or a mapping
        ``{array_name: column | [columns]}`` where a list of columns is stacked into a
        2-D array (rows x columns).
    """

    def __init__(self, paths: str | list[str], columns: Any = None) -> None:
        import pyarrow.parquet as pq

        self.paths = [str(p) for p in ([paths] if isinstance(paths, str | bytes) or hasattr(paths, "__fspath__") else paths)]
        if not self.paths:
            raise DataError("ParquetSource needs at least one file", "path")
        self._rows = []
        schemas = []
        for p in self.paths:
            try:
                meta = pq.ParquetFile(p)
            except Exception as err:
                raise DataError(f"cannot open Parquet file {p!r}: {err}", "path") from None
            self._rows.append(meta.metadata.num_rows)
            schemas.append(meta.schema_arrow)
        mapping = _column_mapping(columns, list(schemas[0].names))
        for path, schema in zip(self.paths, schemas):  # every file: a worker may read any
            available = list(schema.names)
            for name, cols in mapping.items():
                for col in [cols] if isinstance(cols, str) else cols:
                    if col not in available:
                        raise DataError(f"Parquet column {col!r} (for array {name!r}) is not in "
                                        f"the file {path!r}; its columns are {available}",
                                        "columns")
                    try:
                        _check_dtype(col, np.dtype(schema.field(col).type.to_pandas_dtype()))
                    except (DataError, TypeError, NotImplementedError):
                        raise DataError(f"Parquet column {col!r} (for array {name!r}) of the file "
                                        f"{path!r} is non-numeric ({schema.field(col).type})",
                                        "columns") from None
        self.columns = mapping
        if self.n_rows == 0:
            raise DataError("data has no rows")

    @property
    def n_rows(self) -> int:
        return int(sum(self._rows))

    def _arrays(self, table) -> dict[str, np.ndarray]:
        out = {}
        for name, cols in self.columns.items():
            if isinstance(cols, str):
                out[name] = table.column(cols).to_numpy()
            else:
                out[name] = np.column_stack([table.column(c).to_numpy() for c in cols])
        return out

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        sample = self._read_table(0, 1)  # one row group of the first file, not the data
        return {k: (str(check_array(k, v).dtype), v.shape[1:]) for k, v in self._arrays(sample).items()}

    def _read_table(self, start: int, stop: int):
        """Rows [start, stop), reading only the row groups that overlap them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces, offset = [], 0
        wanted = sorted({c for cols in self.columns.values() for c in ([cols] if isinstance(cols, str) else cols)})
        for path, rows in zip(self.paths, self._rows):
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                f = pq.ParquetFile(path)
                groups, first, at = [], None, 0
                for g in range(f.num_row_groups):
                    n = f.metadata.row_group(g).num_rows
                    if at < hi and at + n > lo:
                        groups.append(g)
                        first = at if first is None else first
                    at += n
                table = f.read_row_groups(groups, columns=wanted)
                pieces.append(table.slice(lo - first, hi - lo))
            offset += rows
        return pa.concat_tables(pieces)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        arrays = self._arrays(self._read_table(start, stop))
        return {k: check_array(k, v, row_offset=start) for k, v in arrays.items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "parquet", "paths": self.paths, "n_rows": self.n_rows,
                "columns": self.columns}


def shard_batches(source, num_workers: int, batch_size: int | None,
                  minibatch_size: int | None) -> list[int | None]:
    """Rows per step on each shard: ``batch_size`` for each, or a ready model's
    ``pm.Minibatch`` size split over the shards in proportion to their rows."""
    if batch_size is not None or minibatch_size is None:
        return [batch_size] * num_workers
    return split_batch(minibatch_size, [b - a for a, b in source_bounds(source, num_workers)])


def rows_per_step(source, batches: list[int | None]) -> int:
    """Rows a step evaluates over all shards (a shard's batch of None: all its rows)."""
    sizes = [b - a for a, b in source_bounds(source, len(batches))]
    return sum(s if b is None else min(b, s) for s, b in zip(sizes, batches))
