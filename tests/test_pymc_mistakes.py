"""The first mistakes a PyMC user makes with distvi get plain words, before any work starts.

- a factory that uses the full array where ``data["X"]`` (the minibatch rows) belongs,
- a factory that reads a key the data does not have,
- a Parquet column that is not in the file (the Python API and a config's ``data:``),
- ``dv.resume(store)`` without ``model=``/``data=``: it rebuilds the run from what the store
  records (an importable factory, Zarr or Parquet data), or says what to pass.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pymc as pm
import pytensor.tensor as pt
import pytest
import yaml
import zarr

import distvi as dv
import distvi.inference
import distvi.programs
import distvi.model
import distvi.worker
from distvi.cli import EXIT_ERROR, main
from distvi.config import ConfigError, build_source
from distvi.data import DataError
from distvi.model import DataSchema, ModelAdapter, ModelError
from distvi.store import RunStore, StoreError

from conftest import LinearRegression
from resumable_models import linreg, linreg_data

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
N = 200
DATA = linreg_data(N)
X_FULL, Y_FULL = DATA["X"], DATA["y"]


def _tripwire(*args, **kwargs):
    raise AssertionError("work started before the bad input was reported")


@pytest.fixture
def no_work(monkeypatch):
    """As in test_errors: the compiled step, the shard workers and the data-term compiler
    are tripwires, so an error reported only after work started fails the test."""
    monkeypatch.setattr(distvi.programs, "compile_program", _tripwire)
    monkeypatch.setattr(distvi.programs, "compile_block", _tripwire)
    monkeypatch.setattr(distvi.worker, "ShardWorker", _tripwire)
    monkeypatch.setattr(distvi.model.ModelAdapter, "compile_data_term", _tripwire)


def fit(model, data, n=4, **kwargs):
    kwargs.setdefault("backend", "local")
    return dv.fit(n, model=model, data=data, random_seed=0, progressbar=False, **kwargs)


# ------------------------------------------------------------------ 1. the full array
def full_mean_factory(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", X_FULL @ w, 1.0, observed=data["y"])
    return m


def full_observed_factory(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", data["X"] @ w, 1.0, observed=Y_FULL)
    return m


def full_pm_data_factory(data):
    with pm.Model() as m:
        X = pm.Data("X_all", X_FULL)
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", X @ w, 1.0, observed=data["y"])
    return m


def full_in_potential_factory(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Potential("lik", pm.logp(pm.Normal.dist(X_FULL @ w, 1.0), data["y"]).sum())
    return m


@pytest.mark.parametrize("factory, names", [
    (full_mean_factory, r"\(shape \(200, 3\)\) directly; use data\['X'\] \(the minibatch rows\)"),
    (full_observed_factory, r"\(the observed values of 'y', shape \(200,\)\) directly; use "
                            r"data\['y'\] \(the minibatch rows\)"),
    (full_pm_data_factory, r"\('X_all', shape \(200, 3\)\) directly; use data\['X'\]"),
    (full_in_potential_factory, r"\(shape \(200, 3\)\) directly; use data\['X'\]"),
])
def test_a_full_array_in_the_data_term_is_named(no_work, factory, names):
    with pytest.raises(ModelError, match=rf"model factory '{factory.__name__}': the model uses an "
                                         rf"array of 200 rows {names}"):
        fit(factory, DATA)


def test_the_keys_named_are_those_whose_trailing_shape_matches_else_all(no_work):
    g_full = np.arange(N) % 4

    def index_factory(data):  # a group index: y and g are both one value per row
        with pm.Model() as m:
            a = pm.Normal("a", 0.0, 1.0, shape=4)
            pm.Normal("y", a[g_full], 1.0, observed=data["y"])
        return m

    with pytest.raises(ModelError, match=r"shape \(200,\)\) directly; use data\['y'\] or "
                                         r"data\['g'\] \(the minibatch rows\)"):
        fit(index_factory, {"X": X_FULL, "y": Y_FULL, "g": g_full})
    wide = np.ones((N, 5))

    def wide_factory(data):  # no key has 5 columns: every key is named
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=5)
            pm.Normal("y", wide @ w, 1.0, observed=data["y"])
        return m

    with pytest.raises(ModelError, match=r"shape \(200, 5\)\) directly; use data\['X'\] or "
                                         r"data\['y'\]"):
        fit(wide_factory, DATA)


def _adapt(factory, data):
    return ModelAdapter.from_factory(factory, DataSchema.of(data), n_rows=len(data["y"]))


def test_arrays_that_only_happen_to_have_n_rows_are_not_refused():
    # 3 rows and 3 columns: per-column weights, a prior over 3 coefficients and a reshape to
    # (-1, 3) all have a leading 3, and none of them is the full data
    rng = np.random.default_rng(2)
    data = {"X": rng.normal(size=(3, 3)), "y": rng.normal(size=3)}

    def factory(data):
        with pm.Model() as m:
            w = pm.Normal("w", np.zeros(3), np.ones(3))
            mu = (data["X"] * np.array([1.0, 2.0, 3.0])) @ (w * np.array([0.5, 1.0, 2.0]))
            pm.Normal("y", mu, 1.0, observed=data["y"])
            pm.Normal("s", mu.reshape((-1, 3)).sum(), 1.0, observed=data["y"].reshape((-1, 3)).sum())
        return m

    adapter = _adapt(factory, data)
    assert [lay.name for lay in adapter.layout] == ["w"]
    # two rows: a reshape's shape (-1, 2) is a 2-vector, not two rows of data
    two = {"X": data["X"][:2], "y": data["y"][:2]}

    def pairs(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            pm.Normal("y", (data["X"] @ w).reshape((-1, 2)), 1.0, observed=data["y"].reshape((-1, 2)))
        return m

    _adapt(pairs, two)
    # one row: every array has one row, and a constant of one row is not the data
    one = {"X": data["X"][:1], "y": data["y"][:1]}

    def one_row(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            pm.Normal("y", data["X"] @ w + np.zeros(1), 1.0, observed=data["y"])
        return m

    approx = fit(one_row, one, n=3)
    assert approx.mean.shape == (3,)


def test_a_free_variable_of_n_values_is_no_full_array():
    # 3 rows, and a free variable (with constant parameters) of 3 values that the rows select
    rng = np.random.default_rng(3)
    data = {"g": np.array([0, 1, 2]), "y": rng.normal(size=3)}

    def factory(data):
        with pm.Model() as m:
            a = pm.Normal("a", np.zeros(3), np.full(3, 2.0))
            pm.Normal("y", a[data["g"]], 1.0, observed=data["y"])
        return m

    assert _adapt(factory, data).ndim == 3


# ------------------------------------------------------------------ 2. a missing key
def reads_z(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", data["z"] @ w, 1.0, observed=data["y"])
    return m


def test_a_key_not_in_the_data_is_named_with_the_keys_given(no_work):
    with pytest.raises(ModelError, match=r"^model factory 'reads_z' reads data\['z'\], which is "
                                         r"not in the data; the data has keys \['X', 'y'\]$") as info:
        fit(reads_z, DATA)
    assert info.value.__cause__ is None  # one error, not a KeyError wrapped in another


def test_a_factory_may_still_catch_keyerror_for_an_optional_key():
    def optional_offset(data):
        try:
            offset = data["offset"]
        except KeyError:
            offset = 0.0
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            pm.Normal("y", data["X"] @ w + offset, 1.0, observed=data["y"])
        return m

    assert fit(optional_offset, DATA, n=3).mean.shape == (3,)


# ------------------------------------------------------------------ 3. Parquet columns
@pytest.fixture
def parquet(tmp_path):
    paths = []
    for i, rows in enumerate((slice(0, 120), slice(120, N))):
        path = tmp_path / f"part{i}.parquet"
        table = {"x1": X_FULL[rows, 0], "x2": X_FULL[rows, 1], "x3": X_FULL[rows, 2],
                 "y": Y_FULL[rows]}
        if i == 0:  # columns of the first file only
            table["extra"] = np.ones(120)
            table["note"] = np.array(["a"] * 120)
        pq.write_table(pa.table(table), path)
        paths.append(str(path))
    return paths


COLUMNS = {"X": ["x1", "x2", "x3"], "y": "y"}


def test_a_parquet_column_not_in_the_file_is_named_with_the_file_and_its_columns(parquet):
    with pytest.raises(DataError, match=r"^Parquet column 'x4' \(for array 'X'\) is not in the file "
                                        rf"'{parquet[0]}'; its columns are \['x1', 'x2', 'x3', 'y', "
                                        r"'extra', 'note'\]$"):
        dv.data.ParquetSource(parquet, columns={"X": ["x1", "x4"], "y": "y"})
    # a column of the first file only: the file without it is named
    with pytest.raises(DataError, match=rf"column 'extra' \(for array 'extra'\) is not in the file "
                                        rf"'{parquet[1]}'; its columns are \['x1', 'x2', 'x3', 'y'\]"):
        dv.data.ParquetSource(parquet, columns=["y", "extra"])
    src = dv.data.ParquetSource(parquet, columns=COLUMNS)  # the good mapping reads the rows
    np.testing.assert_array_equal(src.read(0, N)["X"], X_FULL)


@pytest.mark.parametrize("columns, match", [
    ({"X": 3}, r"columns for array 'X' must be a column name or a non-empty list of column names, got 3"),
    ({"X": []}, r"columns for array 'X' must be a column name or a non-empty list"),
    ([1, "y"], r"columns must be column names \(strings\), got 1"),
    (7, r"columns must be a list of column names or a mapping .*got int"),
    ({"n": "note"}, r"Parquet column 'note' \(for array 'n'\) of the file .*part0.parquet' is "
                    r"non-numeric \(string\)"),
])
def test_parquet_columns_of_the_wrong_form_are_one_clear_error(parquet, columns, match):
    with pytest.raises(DataError, match=match):
        dv.data.ParquetSource(parquet[:1], columns=columns)


def test_a_bad_parquet_column_in_the_api_fails_before_the_factory_runs(no_work, parquet):
    calls = []

    def factory(data):
        calls.append(1)
        return linreg(data)

    with pytest.raises(DataError, match="Parquet column 'x9'"):
        fit(factory, dv.data.ParquetSource(parquet, columns={"X": ["x9"], "y": "y"}))
    assert calls == []


def _run_cli(tmp_path, data, capsys):
    store = tmp_path / "run.zarr"
    cfg = {"model": "resumable_models:linreg", "data": data, "n": 5, "backend": "local",
           "progress": "off", "store": str(store), "checkpoint_every": 5}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path)])
    out = capsys.readouterr()
    assert not store.exists()  # nothing half-written
    return code, out


@pytest.mark.parametrize("data, match", [
    ({"columns": {"X": ["x1", "x2", "x4"], "y": "y"}},
     r"data\.columns: Parquet column 'x4' \(for array 'X'\) is not in the file '.*part0\.parquet'; "
     r"its columns are \['x1', 'x2', 'x3', 'y', 'extra', 'note'\]"),
    ({"columns": {"X": "x1", "y": 5}},
     r"data\.columns: Parquet columns for array 'y' must be a column name"),
    ({"path": "notes.txt"}, r"data\.path: cannot open Parquet file 'notes\.txt'"),
])
def test_a_bad_parquet_config_is_one_config_error_line(tmp_path, parquet, capsys, monkeypatch, data, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not parquet")
    code, out = _run_cli(tmp_path, {"kind": "parquet", "path": parquet, **data}, capsys)
    lines = out.err.strip().splitlines()
    assert code == EXIT_ERROR and out.out == ""
    assert len(lines) == 1 and lines[0].startswith("distvi: error: data.")
    assert __import__("re").search(match, lines[0]), lines[0]


def test_a_bad_zarr_array_in_a_config_names_data_arrays(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    group = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    for k, v in DATA.items():
        group.create_array(k, data=v, chunks=(50, *v.shape[1:]))
    code, out = _run_cli(tmp_path, {"kind": "zarr", "path": "d.zarr", "arrays": ["X", "Y"]}, capsys)
    assert code == EXIT_ERROR
    assert out.err.strip().splitlines() == [
        "distvi: error: data.arrays: Zarr group 'd.zarr' has no array 'Y'; it has ['X', 'y']"]
    # the same from Python, for build_source's callers (distvi summary --sample, resume)
    with pytest.raises(ConfigError, match=r"^data\.arrays: Zarr group 'd\.zarr' has no array 'Y'"):
        build_source({"kind": "zarr", "path": "d.zarr", "arrays": ["X", "Y"]})


# ------------------------------------------------------------------ 4. resume(store)
@pytest.fixture(scope="module")
def zarr_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.zarr"
    group = zarr.open_group(str(path), mode="w")
    for k, v in DATA.items():
        group.create_array(k, data=v, chunks=(50, *v.shape[1:]))
    return str(path)


def start(model, data, store, n=20, **kwargs):
    inf = dv.ADVI(model=model, data=data, random_seed=3, batch_size=40, backend="local", **kwargs)
    with inf:
        inf.fit(n, progressbar=False, obj_optimizer=dv.adam(learning_rate=0.05), store=store,
                checkpoint_every=5)
    return inf


RESUME_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import distvi as dv
    approx = dv.resume({store!r}, n=40, progressbar=False)
    print(json.dumps([p.tolist() for p in approx.params_values]))
""")


def test_resume_without_model_or_data_equals_resume_with_them(tmp_path, zarr_data):
    twins = [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    for store in twins:
        start(linreg, dv.data.ZarrSource(zarr_data), store)
    rebuild = RunStore.open(twins[0]).attrs["rebuild"]
    assert rebuild == {"model": "resumable_models:linreg", "model_why": None,
                       "data": {"kind": "zarr", "path": zarr_data, "arrays": ["X", "y"]}}
    # the model is imported by its reference in a fresh process (tests/ on its path only)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-c", RESUME_IN_A_FRESH_PROCESS.format(store=twins[0])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bare = [np.array(p) for p in json.loads(done.stdout.strip().splitlines()[-1])]
    given = dv.resume(twins[1], n=40, model=linreg, data=dv.data.ZarrSource(zarr_data),
                      progressbar=False)
    for a, b in zip(bare, given.params_values):
        np.testing.assert_array_equal(a, b)  # bit for bit (json keeps every float64 digit)
    runs = [dv.open_run(s) for s in twins]
    assert [r.status for r in runs] == ["finished", "finished"]
    np.testing.assert_array_equal(runs[0].traces["step"], np.arange(1, 41))
    np.testing.assert_array_equal(runs[0].traces["loss"], runs[1].traces["loss"])
    # in this process too, and with model= given but not data=
    dv.resume(twins[0], n=45, model=linreg, progressbar=False)
    assert dv.open_run(twins[0]).checkpoint.step == 45


def test_resume_reopens_parquet_data_by_path_and_columns(tmp_path, parquet, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p, tmp_path) for p in parquet]
    twins = [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    for store in twins:
        start(linreg, dv.data.ParquetSource(relative, columns=COLUMNS), store, n=10)
    assert RunStore.open(twins[0]).attrs["rebuild"]["data"] == {
        "kind": "parquet", "paths": parquet, "columns": COLUMNS}  # absolute: resumable elsewhere
    monkeypatch.chdir(ROOT)
    bare = dv.resume(twins[0], n=15, progressbar=False)
    given = dv.resume(twins[1], n=15, model=linreg,
                      data=dv.data.ParquetSource(parquet, columns=COLUMNS), progressbar=False)
    for a, b in zip(bare.params_values, given.params_values):
        np.testing.assert_array_equal(a, b)


def attrs_of(store):
    return json.dumps(RunStore.open(store).attrs, sort_keys=True)


def refused(store, match, **kwargs):
    before = attrs_of(store)
    with pytest.raises(StoreError, match=match):
        dv.resume(store, n=8, progressbar=False, **kwargs)
    assert attrs_of(store) == before  # refused before anything was written


MAIN_FACTORY = textwrap.dedent("""
    import pymc as pm

    def script_factory(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
        return m
""")


def test_resume_without_model_names_why_the_factory_is_not_importable(tmp_path, zarr_data):
    script = {"__name__": "__main__"}  # as a script or notebook defines it
    exec(MAIN_FACTORY, script)

    def closure(data):
        return linreg(data)

    cases = [
        (script["script_factory"], r"factory 'script_factory' is defined in __main__ \(a script, "
                                   r"notebook or the interpreter\)"),
        (lambda data: linreg(data), r"factory '.*<lambda>' \(in test_pymc_mistakes\) is a lambda"),
        (closure, r"factory '.*<locals>.closure' \(in test_pymc_mistakes\) is defined inside a "
                  r"function \(a closure\)"),
        (functools.partial(linreg), r"factory \(a functools.partial object\) is not a function "
                                    r"defined in a module"),
        (LinearRegression(n_rows=20).factory,  # a method of an object
         r"factory 'LinearRegression.factory': conftest:LinearRegression.factory does not "
         r"import to it \(a method of an object"),
    ]
    source = dv.data.ZarrSource(zarr_data)
    for i, (factory, why) in enumerate(cases):
        store = str(tmp_path / f"s{i}.zarr")
        start(factory, source, store, n=4)
        assert RunStore.open(store).attrs["rebuild"]["model"] is None
        refused(store, rf"resume\('{store}'\) needs model=: the run's model {why}")
        refused(store, rf"needs model=", data=source)  # data= alone does not help


def test_resume_without_model_of_a_ready_model_says_to_pass_it(tmp_path):
    with pm.Model() as ready:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", X_FULL @ w, 1.0, observed=Y_FULL)
    store = str(tmp_path / "ready.zarr")
    start(ready, None, store, n=4)
    refused(store, r"needs model=: the run's model was a ready pm.Model, which is not importable "
                   r"by reference: pass model= \(the same pm.Model\)")
    dv.resume(store, n=8, model=ready, progressbar=False)  # and with it, it resumes
    assert dv.open_run(store).checkpoint.step == 8


def test_resume_of_in_memory_arrays_names_them_and_says_pass_data(tmp_path):
    store = str(tmp_path / "arrays.zarr")
    start(linreg, DATA, store, n=4)
    for kwargs in ({}, {"model": linreg}):
        refused(store, r"needs data=: the run's data were in-memory arrays \(X \(200, 3\) float64, "
                       r"y \(200,\) float64\), which a run store does not hold; pass data= with the "
                       r"same arrays$", **kwargs)


def test_resume_refuses_a_store_without_references_or_with_a_stale_one(tmp_path, zarr_data):
    store = str(tmp_path / "old.zarr")
    start(linreg, dv.data.ZarrSource(zarr_data), store, n=4)
    group = zarr.open_group(store, mode="r+")
    rebuild = dict(group.attrs["rebuild"])
    del group.attrs["rebuild"]  # as a store written before distvi recorded references
    refused(store, r"needs model=: the store records no model reference \(it was written by an "
                   r"older distvi\)")
    refused(store, r"needs data=: the store records no data reference", model=linreg)
    group.attrs["rebuild"] = {**rebuild, "model": "no_such_module_here:linreg"}
    refused(store, r"cannot import the run's model factory 'no_such_module_here:linreg' "
                   r"\(ModuleNotFoundError: .*\): pass model=")
    group.attrs["rebuild"] = {**rebuild, "data": {**rebuild["data"], "path": str(tmp_path / "gone.zarr")}}
    refused(store, r"cannot open the run's data again \(cannot open Zarr group '.*gone\.zarr'.*\): "
                   r"pass data=")
    group.attrs["rebuild"] = {**rebuild, "model": 3}
    with pytest.raises(StoreError, match=r"damaged: attribute 'rebuild' is not a model reference"):
        dv.open_run(store)
    group.attrs["rebuild"] = rebuild  # the store's own record resumes it
    dv.resume(store, n=8, progressbar=False)
    assert dv.open_run(store).checkpoint.step == 8


def test_credentials_in_a_data_url_are_not_recorded_and_come_from_the_environment(tmp_path):
    url = f"memory://alice:s3cret@distvi-{os.getpid()}/rows.zarr"
    group = zarr.open_group(url, mode="w")
    for k, v in DATA.items():
        group.create_array(k, data=v, chunks=(50, *v.shape[1:]))
    store = str(tmp_path / "url.zarr")
    start(linreg, dv.data.ZarrSource(url), store, n=4)
    attrs = RunStore.open(store).attrs
    assert "s3cret" not in json.dumps(attrs)
    assert attrs["rebuild"]["data"]["path"] == f"memory://alice:***@distvi-{os.getpid()}/rows.zarr"
    # resumed, the masked credentials are dropped (fsspec's configuration supplies them): the
    # memory filesystem keys its files by the whole URL, so the data are not found without
    refused(store, rf"cannot open the run's data again \(cannot open Zarr group "
                   rf"'memory://distvi-{os.getpid()}/rows.zarr'")
