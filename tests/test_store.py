"""The Zarr run store: what it records, exact resume, a killed run, and what it refuses."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import distvi as dv
from distvi.store import RunStore, StoreError

from conftest import LinearRegression

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lr():
    return LinearRegression(n_rows=300, n_coef=3, seed=5)


METHODS = {"ADVI": (dv.ADVI, {}), "FullRankADVI": (dv.FullRankADVI, {}),
           "SVGD": (dv.SVGD, {"n_particles": 20})}


def make(lr, method, backend="local", **kw):
    cls, extra = METHODS[method]
    return cls(model=lr.factory, data=lr.data, random_seed=3, batch_size=50,
               num_workers=2 if backend == "ray" else 1, backend=backend, **extra, **kw)


def fit(inf, n, **kw):
    with inf:
        inf.fit(n, progressbar=False, score=True, obj_optimizer=dv.adam(learning_rate=0.02), **kw)
    return inf


@pytest.fixture(scope="module")
def uninterrupted(lr):
    return {m: fit(make(lr, m), 1000) for m in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_split_run_equals_uninterrupted_run_exactly(lr, uninterrupted, method, tmp_path):
    store = tmp_path / "run.zarr"
    fit(make(lr, method), 500, store=store, checkpoint_every=100)
    assert dv.open_run(store).checkpoint.step == 500
    resumed = fit(make(lr, method), 1000, store=store, resume=True)
    full = uninterrupted[method]
    np.testing.assert_array_equal(resumed.hist, full.hist)
    for a, b in zip(resumed.approx.params_values, full.approx.params_values):
        np.testing.assert_array_equal(a, b)
    run = dv.open_run(store)
    assert run.status == "finished" and run.checkpoint.step == 1000
    np.testing.assert_array_equal(run.traces["step"], np.arange(1, 1001))
    np.testing.assert_array_equal(run.traces["loss"], full.hist)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("method", list(METHODS))
def test_split_run_equals_uninterrupted_run_on_ray(lr, method, tmp_path):
    # 300 steps as 150 + 150 (a Ray step costs milliseconds: the 1,000-step split is local)
    full = fit(make(lr, method, "ray"), 300)
    store = tmp_path / "run.zarr"
    fit(make(lr, method, "ray"), 150, store=store, checkpoint_every=50)
    resumed = fit(make(lr, method, "ray"), 300, store=store, resume=True)
    np.testing.assert_array_equal(resumed.hist, full.hist)
    for a, b in zip(resumed.approx.params_values, full.approx.params_values):
        np.testing.assert_array_equal(a, b)


def test_store_records_config_layout_data_versions_and_posterior(lr, tmp_path):
    store = tmp_path / "run.zarr"
    inf = fit(make(lr, "ADVI"), 300, store=store, checkpoint_every=100)
    run = dv.open_run(store, model=lr.factory, data=lr.data)
    assert run.config["method"] == "ADVI"
    # stl: the choice recorded (None: off for a fixed n, on for n=None)
    assert run.config["inference"] == {"batch_size": 50, "num_workers": 1, "backend": "local",
                                       "random_seed": 3, "beta": 1.0, "stl": None}
    assert run.config["fit"]["optimizer"] == {"name": "adam", "hyper": {
        "learning_rate": 0.02, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}}
    assert run.config["fit"]["n"] == 300 and run.config["fit"]["checkpoint_every"] == 100
    assert run.layout == [{"name": "w", "rv_name": "w", "shape": [3], "start": 0, "stop": 3,
                           "transform": None}]
    assert run.data["n_rows"] == 300 and run.data["shards"] == [[0, 300]]
    assert run.data["arrays"] == {"X": ["float64", [3]], "y": ["float64", []]}
    assert set(run.versions) >= {"distvi", "pymc", "pytensor", "ray", "zarr"}
    traces = run.traces
    assert set(traces) == {"step", "loss", "grad_norm", "step_seconds", "learning_rate", "rows_per_s"}
    np.testing.assert_array_equal(traces["learning_rate"], 0.02)
    assert np.all(traces["step_seconds"] > 0) and np.all(traces["grad_norm"] > 0)
    np.testing.assert_allclose(traces["rows_per_s"], 50 / traces["step_seconds"])
    # the approximation at the last checkpoint is the fitted one
    np.testing.assert_array_equal(run.approximation.mean, inf.approx.mean)
    # the posterior: an InferenceData group readable with plain xarray
    tree = xr.open_datatree(f"{store}/posterior", engine="zarr")
    assert tree["posterior"]["w"].shape == (1, 1000, 3)
    np.testing.assert_allclose(run.posterior().posterior["w"].mean(("chain", "draw")),
                               inf.approx.mean, atol=4 * inf.approx.std.max() / np.sqrt(1000) + 1e-3)


def test_a_fsspec_url_store_works(lr):
    url = f"memory://distvi-test-{os.getpid()}/run.zarr"
    inf = fit(make(lr, "ADVI"), 200, store=url, checkpoint_every=50)
    run = dv.open_run(url)
    assert run.status == "finished" and run.checkpoint.step == 200
    np.testing.assert_array_equal(run.traces["loss"], inf.hist)


KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import distvi as dv
    from conftest import LinearRegression

    lr = LinearRegression(n_rows=300, n_coef=3, seed=5)

    def report(approx, losses, step):
        print(step, flush=True)
        time.sleep(0.002)
    report.call_every = 1  # every step, through fused blocks as the fit compared runs

    inf = dv.FullRankADVI(model=lr.factory, data=lr.data, random_seed=3, batch_size=50)
    inf.fit(3000, progressbar=False, obj_optimizer=dv.adam(learning_rate=0.02),
            store={store!r}, checkpoint_every=50, callbacks=[report])
""")


def test_a_killed_fit_resumes_without_gap_or_duplicate(lr, tmp_path):
    store = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(tests=str(TESTS), store=store)],
                            stdout=subprocess.PIPE, text=True)
    last = 0
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            last = int(line)
            if last >= 420 or time.monotonic() > deadline:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last >= 420
    ckpt = dv.open_run(store).checkpoint
    assert ckpt is not None and 0 < last - ckpt.step <= 50  # at most checkpoint_every redone
    approx = dv.resume(store, model=lr.factory, data=lr.data, progressbar=False)
    run = dv.open_run(store)
    assert run.status == "finished"
    np.testing.assert_array_equal(run.traces["step"], np.arange(1, 3001))  # no gap, no duplicate
    full = dv.FullRankADVI(model=lr.factory, data=lr.data, random_seed=3, batch_size=50)
    full.fit(3000, progressbar=False, obj_optimizer=dv.adam(learning_rate=0.02))
    np.testing.assert_array_equal(run.traces["loss"], full.hist)
    np.testing.assert_array_equal(approx.cov, full.approx.cov)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(lr, tmp_path, monkeypatch):
    rs = RunStore.create(tmp_path / "r.zarr", {"config": {"fit": {}}, "layout": [], "data": {}})
    good = [np.arange(3.0), np.eye(2)]
    rs.checkpoint(good, [np.zeros(3), np.array(7)], step=100, opt_step=100, draw_position=300)
    real_write = RunStore._write

    def fails_half_way(self, path, value):
        if path.endswith("c000000000200"):
            real_write(self, path, value[: value.size // 2])  # a torn write, then the crash
            raise OSError("disk full")
        real_write(self, path, value)

    monkeypatch.setattr(RunStore, "_write", fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        rs.checkpoint([good[0] + 1, good[1]], [np.ones(3), np.array(8)], 200, 200, 600)
    again = RunStore.open(tmp_path / "r.zarr", mode="r+")
    ckpt = again.last_checkpoint()
    assert ckpt.step == 100 and ckpt.draw_position == 300
    np.testing.assert_array_equal(ckpt.params[1], np.eye(2))
    np.testing.assert_array_equal(ckpt.opt_state[1], 7)
    monkeypatch.setattr(RunStore, "_write", real_write)
    again.checkpoint([good[0] + 1, good[1]], [np.ones(3), np.array(8)], 200, 200, 600)
    assert again.last_checkpoint().step == 200
    assert list(zarr.open_group(str(tmp_path / "r.zarr"))["checkpoints"].array_keys()) == ["c000000000200"]


# ---------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def finished(lr, tmp_path_factory):
    store = tmp_path_factory.mktemp("finished") / "run.zarr"
    fit(make(lr, "ADVI"), 100, store=store, checkpoint_every=50)
    return store


def unchanged(store):
    return {p: p.stat().st_mtime_ns for p in Path(store).rglob("*") if p.is_file()}


def test_an_existing_store_is_not_overwritten(lr, finished):
    before = unchanged(finished)
    with pytest.raises(StoreError, match="already exists.*resume=True"):
        fit(make(lr, "ADVI"), 100, store=finished)
    assert unchanged(finished) == before


def test_resume_refuses_another_model_or_other_data(lr, finished):
    before = unchanged(finished)
    other = LinearRegression(n_rows=300, n_coef=4, seed=5)
    with pytest.raises(StoreError, match=r"another model.*w\(3,\).*w\(4,\)"):
        dv.ADVI(model=other.factory, data=other.data, random_seed=3, batch_size=50).fit(
            200, store=finished, resume=True, progressbar=False)
    fewer = LinearRegression(n_rows=200, n_coef=3, seed=5)
    with pytest.raises(StoreError, match="other data: n_rows 300 there, 200 here"):
        dv.resume(finished, n=200, model=fewer.factory, data=fewer.data)
    with pytest.raises(StoreError, match="other data: shards"):
        dv.resume(finished, n=200, model=lr.factory, data=lr.data, num_workers=2, backend="local")
    with pytest.raises(StoreError, match="optimizer"):
        dv.ADVI(model=lr.factory, data=lr.data, random_seed=3, batch_size=50).fit(
            200, store=finished, resume=True, obj_optimizer=dv.sgd(learning_rate=0.1))
    assert unchanged(finished) == before


def test_foreign_missing_or_damaged_stores_are_refused(lr, finished, tmp_path):
    with pytest.raises(StoreError, match="no run store at"):
        dv.open_run(tmp_path / "nothing.zarr")
    with pytest.raises(StoreError, match="no run store at"):
        dv.resume(tmp_path / "nothing.zarr", model=lr.factory, data=lr.data)
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    foreign.attrs["hello"] = "world"
    with pytest.raises(StoreError, match="not a distvi run store"):
        dv.open_run(tmp_path / "foreign.zarr")
    damaged = tmp_path / "damaged.zarr"
    fit(make(lr, "ADVI"), 50, store=damaged, checkpoint_every=50)
    zarr.open_group(str(damaged), mode="r+").__delitem__("trace/loss")
    with pytest.raises(StoreError, match=r"damaged: traces \['loss'\]"):
        dv.open_run(damaged)
    g = zarr.open_group(str(damaged), mode="r+")
    del g.attrs["config"]
    with pytest.raises(StoreError, match="damaged: attribute 'config' is not a mapping"):
        dv.open_run(damaged)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"resume": True}, ValueError, "resume=True needs the store"),
    ({"checkpoint_every": 10}, ValueError, "checkpoint_every needs a store"),
    ({"store": "x.zarr", "checkpoint_every": 0}, ValueError, "checkpoint_every must be >= 1"),
    ({"store": "x.zarr", "resume": "yes"}, TypeError, "resume must be True or False"),
    ({"store": 3}, TypeError, "store must be a path or an fsspec URL"),
])
def test_run_keywords_are_checked_before_any_work(lr, tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    inf = make(lr, "ADVI")
    with pytest.raises(error, match=match):
        inf.fit(10, progressbar=False, **kwargs)
    assert inf.state is None and list(tmp_path.iterdir()) == []
