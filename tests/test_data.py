"""Data sources: Zarr and Parquet read by row range, checked before any work starts."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from distvi.data import ArraySource, DataError, ParquetSource, ZarrSource, as_source

from conftest import write_zarr


@pytest.fixture()
def arrays():
    rng = np.random.default_rng(0)
    return {"X": rng.normal(size=(250, 3)), "y": rng.integers(0, 2, 250)}


def test_zarr_source_reads_row_ranges_like_the_arrays(tmp_path, arrays):
    src = ZarrSource(write_zarr(tmp_path / "d.zarr", arrays))
    assert src.n_rows == 250 and src.chunk_rows == 100
    part = src.read(90, 210)
    np.testing.assert_array_equal(part["X"], arrays["X"][90:210])
    np.testing.assert_array_equal(part["y"], arrays["y"][90:210])
    assert src.schema() == ArraySource(arrays).schema()


def test_a_path_is_taken_as_a_zarr_group(tmp_path, arrays):
    assert isinstance(as_source(write_zarr(tmp_path / "d.zarr", arrays)), ZarrSource)


def test_zarr_errors_name_the_problem(tmp_path, arrays):
    with pytest.raises(DataError, match="cannot open Zarr group"):
        ZarrSource(str(tmp_path / "missing.zarr"))
    path = write_zarr(tmp_path / "d.zarr", arrays)
    with pytest.raises(DataError, match="no array 'z'"):
        ZarrSource(path, arrays=["X", "z"])
    bad = write_zarr(tmp_path / "rows.zarr", {"X": arrays["X"], "y": arrays["y"][:10]})
    with pytest.raises(DataError, match="different row counts"):
        ZarrSource(bad)
    text = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    text.create_array("s", shape=(5,), dtype=np.dtype("U3"))
    with pytest.raises(DataError, match="non-numeric"):
        ZarrSource(str(tmp_path / "s.zarr"))


def test_zarr_nan_is_reported_with_the_global_row(tmp_path, arrays):
    arrays["X"][137, 1] = np.nan
    src = ZarrSource(write_zarr(tmp_path / "d.zarr", arrays))
    with pytest.raises(DataError, match="'X' has NaN or inf at row 137"):
        src.read(100, 200)


def test_parquet_source_maps_columns_to_arrays(tmp_path, arrays):
    table = pa.table({"a": arrays["X"][:, 0], "b": arrays["X"][:, 1], "c": arrays["X"][:, 2],
                      "y": arrays["y"]})
    pq.write_table(table.slice(0, 120), tmp_path / "p0.parquet", row_group_size=50)
    pq.write_table(table.slice(120), tmp_path / "p1.parquet")
    src = ParquetSource([tmp_path / "p0.parquet", tmp_path / "p1.parquet"],
                        columns={"X": ["a", "b", "c"], "y": "y"})
    assert src.n_rows == 250
    for a, b in [(100, 150), (60, 70), (0, 250)]:  # across files and row groups
        part = src.read(a, b)
        np.testing.assert_array_equal(part["X"], arrays["X"][a:b])
        np.testing.assert_array_equal(part["y"], arrays["y"][a:b])


def test_parquet_errors_name_the_problem(tmp_path, arrays):
    pq.write_table(pa.table({"a": [1.0, 2.0], "s": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="column 'zz'"):
        ParquetSource(tmp_path / "p.parquet", columns=["a", "zz"])
    with pytest.raises(DataError, match="non-numeric"):
        ParquetSource(tmp_path / "p.parquet", columns=["s"])
    with pytest.raises(DataError, match="cannot open Parquet"):
        ParquetSource(tmp_path / "nope.parquet")
