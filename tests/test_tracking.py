"""MLflow tracking against real MLflow: a SQLite store, a live ``mlflow server``, a server
that is never there, and one that dies during the fit."""

import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import distvi as dv

from conftest import LinearRegression, MlflowServer, free_port

N, LOG_EVERY, BATCH, SEED, LR = 300, 50, 50, 3, 0.05
WINDOW_METRICS = ("loss_running", "grad_norm", "step_seconds", "rows_per_s", "learning_rate")
STOPPED = "MLflow tracking stopped"


@pytest.fixture(scope="module")
def lr():
    return LinearRegression(n_rows=300, n_coef=3, seed=7)


def fit(lr, tracker, store, callbacks=None):
    """One recorded fit: N steps of minibatch ADVI with a store and ``tracker``."""
    inf = dv.ADVI(model=lr.factory, data=lr.data, random_seed=SEED, batch_size=BATCH)
    inf.fit(N, obj_optimizer=dv.adam(learning_rate=LR), progressbar=False, store=str(store),
            checkpoint_every=100, tracking=tracker, callbacks=callbacks)
    return inf


def history(client, run_id, key):
    """(steps, values) of a metric, in step order."""
    ms = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in ms]), np.array([m.value for m in ms])


def git_head(repo):
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def fail_fast_defaults(monkeypatch):
    """Test distvi's own request retries/timeout, not the caller's (and undo distvi setting
    them in os.environ)."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


def stopped_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and STOPPED in str(w.message)]


def assert_store_complete(store, hist):
    run = dv.open_run(str(store))
    assert run.status == "finished"
    assert run.checkpoint.step == N
    assert len(run.traces["loss"]) == N
    np.testing.assert_array_equal(run.traces["loss"], hist)
    assert run.posterior().posterior["w"].shape[-1] == 3
    return run


# ---------------------------------------------------------------------------- servers
@pytest.fixture
def dying_server(tmp_path):
    srv = MlflowServer(tmp_path / "dying_server")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- tests
def test_sqlite_run_holds_config_every_loss_windows_tags_and_artifacts(lr, tmp_path, monkeypatch):
    """Everything a fit logs, read back through MlflowClient from a local SQLite store."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = tmp_path / "run.zarr"
    tracker = dv.MLflowTracking(experiment="sqlite", tracking_uri=uri, log_every=LOG_EVERY)
    inf = fit(lr, tracker, store)
    assert not tracker.warned and tracker.run_id is not None
    assert len(inf.hist) == N

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time is not None

    p = run.data.params
    assert p["method"] == "ADVI"
    assert p["fit.optimizer.name"] == "adam"
    assert float(p["fit.optimizer.hyper.learning_rate"]) == LR
    assert int(p["inference.batch_size"]) == BATCH
    assert int(p["inference.random_seed"]) == SEED
    assert int(p["fit.n"]) == N and int(p["fit.checkpoint_every"]) == 100

    # MLflow gets the loss at each window's end; every step's loss is in the store
    steps, loss = history(client, tracker.run_id, "loss")
    np.testing.assert_array_equal(steps, np.arange(LOG_EVERY, N + 1, LOG_EVERY))
    np.testing.assert_array_equal(loss, inf.hist[steps - 1])

    # window metrics at the log_every steps, against the per-step traces in the store
    traces = assert_store_complete(store, inf.hist).traces
    ends = np.arange(LOG_EVERY, N + 1, LOG_EVERY)
    windows = [slice(e - LOG_EVERY, e) for e in ends]
    got = {k: history(client, tracker.run_id, k) for k in WINDOW_METRICS}
    for k, (s, _) in got.items():
        np.testing.assert_array_equal(s, ends, err_msg=k)
    np.testing.assert_allclose(got["loss_running"][1], [inf.hist[w].mean() for w in windows], rtol=1e-12)
    np.testing.assert_allclose(got["grad_norm"][1], [traces["grad_norm"][w].mean() for w in windows],
                               rtol=1e-12)
    sec = np.array([traces["step_seconds"][w].mean() for w in windows])
    np.testing.assert_allclose(got["step_seconds"][1], sec, rtol=1e-12)
    np.testing.assert_allclose(got["rows_per_s"][1], BATCH / sec, rtol=1e-12)
    np.testing.assert_array_equal(got["learning_rate"][1], LR)

    tags = run.data.tags
    assert tags["distvi.store"] == str(store)
    assert tags["distvi.version"] == dv.__version__
    assert tags["distvi.method"] == "ADVI"

    top = {a.path: a.is_dir for a in client.list_artifacts(tracker.run_id)}
    assert top == {"loss.png": False, "posterior_summary.csv": False, "store": True}
    dl = tmp_path / "download"
    png = client.download_artifacts(tracker.run_id, "loss.png", str(dl))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(client.download_artifacts(tracker.run_id, "posterior_summary.csv", str(dl)),
                      index_col=0)
    assert list(csv.index) == ["w[0]", "w[1]", "w[2]"]
    draws = dv.open_run(str(store)).posterior().posterior["w"]
    np.testing.assert_allclose(csv["mean"], draws.mean(("chain", "draw")).values, atol=6e-4)
    # the store artifact is a byte-for-byte copy of the run store
    copy = Path(client.download_artifacts(tracker.run_id, "store", str(dl)))
    files = {f.relative_to(store) for f in store.rglob("*") if f.is_file()}
    assert files and files == {f.relative_to(copy) for f in copy.rglob("*") if f.is_file()}
    for f in files:
        assert (copy / f).read_bytes() == (store / f).read_bytes(), f

    exp = client.get_experiment_by_name("sqlite")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert run.info.artifact_uri.startswith(exp.artifact_location)
    assert (tmp_path / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_live_server_receives_metrics_params_and_artifacts(lr, server, tmp_path, monkeypatch):
    """A fit tracked over HTTP by a real ``mlflow server``; artifacts land in its
    --artifacts-destination."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # a git checkout: the run is tagged with its commit
    before = git_head(repo)
    store = tmp_path / "run.zarr"
    tracker = dv.MLflowTracking(experiment="server", tracking_uri=server.url, log_every=LOG_EVERY,
                                run_name="over-http")
    inf = fit(lr, tracker, store)
    assert not tracker.warned

    client = MlflowClient(server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "over-http"
    steps, loss = history(client, tracker.run_id, "loss")
    np.testing.assert_array_equal(steps, np.arange(LOG_EVERY, N + 1, LOG_EVERY))
    np.testing.assert_array_equal(loss, inf.hist[steps - 1])
    s, v = history(client, tracker.run_id, "loss_running")
    np.testing.assert_array_equal(s, np.arange(LOG_EVERY, N + 1, LOG_EVERY))
    np.testing.assert_allclose(v, inf.hist.reshape(-1, LOG_EVERY).mean(axis=1), rtol=1e-12)
    p = run.data.params
    assert (p["method"], p["fit.optimizer.name"]) == ("ADVI", "adam")
    assert float(p["fit.optimizer.hyper.learning_rate"]) == LR
    assert (int(p["inference.batch_size"]), int(p["inference.random_seed"])) == (BATCH, SEED)
    assert run.data.tags["distvi.store"] == str(store)
    if before is not None:  # (someone may commit while the test runs)
        assert run.data.tags["git.commit"] in {before, git_head(repo)}

    top = {a.path: a.is_dir for a in client.list_artifacts(tracker.run_id)}
    assert top == {"loss.png": False, "posterior_summary.csv": False, "store": True}
    inner = {a.path for a in client.list_artifacts(tracker.run_id, "store")}
    assert "store/zarr.json" in inner and "store/trace" in inner
    # proxied: the files are in the server's artifact directory, not next to the client
    assert [p.name for p in server.artifacts.rglob("posterior_summary.csv")] == ["posterior_summary.csv"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert_store_complete(store, inf.hist)


def test_unreachable_server_warns_once_and_the_fit_and_store_are_complete(lr, tmp_path, monkeypatch):
    """Nothing listens on the port: one warning, no run id, the run store is whole."""
    fail_fast_defaults(monkeypatch)
    store = tmp_path / "run.zarr"
    tracker = dv.MLflowTracking(experiment="nowhere", tracking_uri=f"http://127.0.0.1:{free_port()}",
                                log_every=LOG_EVERY)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        inf = fit(lr, tracker, store)
    assert time.monotonic() - t0 < 60
    (warned,) = stopped_warnings(record)
    assert "could not start the MLflow run" in str(warned.message)
    assert tracker.warned and tracker.run_id is None
    assert len(inf.hist) == N and np.all(np.isfinite(inf.hist))
    assert_store_complete(store, inf.hist)


def test_server_dying_mid_run_warns_once_and_the_store_equals_the_fit(lr, dying_server, tmp_path,
                                                                     monkeypatch):
    """The server is SIGKILLed at step 150 of 300, after it has the first 150 losses."""
    fail_fast_defaults(monkeypatch)
    store = tmp_path / "run.zarr"
    tracker = dv.MLflowTracking(experiment="dying", tracking_uri=dying_server.url, log_every=LOG_EVERY,
                                min_interval_s=0)  # one call per window, so the cut is exact
    kill_at = N // 2
    seen = []

    def kill_server(approx, losses, step):
        if step != kill_at:
            return
        # the batches up to this step are queued; let them land so the cut is exact
        client = MlflowClient(dying_server.url)
        end = time.monotonic() + 30
        while len(client.get_metric_history(tracker.run_id, "loss")) < kill_at // LOG_EVERY:
            assert time.monotonic() < end, "the first batches never reached the server"
            time.sleep(0.1)
        dying_server.kill()
        seen.append(losses.copy())

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        inf = fit(lr, tracker, store, callbacks=[kill_server])
    assert len(seen) == 1 and dying_server.proc.poll() is not None
    (warned,) = stopped_warnings(record)
    assert "logging failed" in str(warned.message)
    assert tracker.warned and tracker.run_id is not None
    assert len(inf.hist) == N
    np.testing.assert_array_equal(seen[0], inf.hist[:kill_at])
    assert_store_complete(store, inf.hist)

    # what the server had written before it died, read from its database directly
    db = MlflowClient(f"sqlite:///{dying_server.db}")
    steps, loss = history(db, tracker.run_id, "loss")
    np.testing.assert_array_equal(steps, np.arange(LOG_EVERY, kill_at + 1, LOG_EVERY))
    np.testing.assert_array_equal(loss, inf.hist[steps - 1])
    assert db.get_run(tracker.run_id).info.status == "RUNNING"  # never told the end


def test_bad_tracking_arguments_are_refused_before_any_work(lr, tmp_path):
    inf = dv.ADVI(model=lr.factory, data=lr.data, random_seed=SEED, batch_size=BATCH)
    with pytest.raises(TypeError, match="tracking must be"):
        inf.fit(10, progressbar=False, store=str(tmp_path / "run.zarr"), tracking="yes")
    assert not (tmp_path / "run.zarr").exists()
    assert len(inf.hist) == 0
    with pytest.raises(ValueError, match="log_every"):
        dv.MLflowTracking(log_every=0)


def test_one_tracker_serves_two_fits(lr, tmp_path, monkeypatch):
    """A tracker that failed once (unreachable server) still records the next fit in full."""
    monkeypatch.chdir(tmp_path)
    fail_fast_defaults(monkeypatch)
    tracker = dv.MLflowTracking(experiment="reuse", tracking_uri=f"http://127.0.0.1:{free_port()}",
                                log_every=LOG_EVERY)
    with pytest.warns(RuntimeWarning, match="MLflow tracking stopped"):
        fit(lr, tracker, tmp_path / "first.zarr")
    assert tracker.warned
    tracker.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    inf = fit(lr, tracker, tmp_path / "second.zarr")
    assert not tracker.warned
    client = MlflowClient(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    steps, loss = history(client, tracker.run_id, "loss")
    np.testing.assert_array_equal(loss, inf.hist[steps - 1])
    assert steps[-1] == N


def test_run_profiling_with_tracking_times_the_logging_and_logs_a_run(lr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = dv.MLflowTracking(experiment="profiling", tracking_uri=uri, log_every=10,
                                min_interval_s=0)
    inf = dv.ADVI(model=lr.factory, data=lr.data, random_seed=SEED, batch_size=BATCH)
    inf.fit(10, obj_optimizer=dv.adam(learning_rate=LR), progressbar=False)
    mean = inf.approx.mean.copy()
    profile = inf.run_profiling(100, tracking=tracker)
    assert profile.phases["logging"] > 0
    np.testing.assert_array_equal(inf.approx.mean, mean)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["distvi.profiling"] == "true"
    steps, _ = history(MlflowClient(uri), tracker.run_id, "grad_norm")
    np.testing.assert_array_equal(steps, np.arange(20, 111, 10))


def test_a_diagnostic_mlflow_cannot_take_warns_and_the_store_still_has_it(lr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = dv.MLflowTracking(experiment="diag", tracking_uri=uri)
    store = tmp_path / "run.zarr"
    inf = fit(lr, tracker, store)
    tracker.run_id = "no-such-run"  # the run is gone from the server's point of view
    with pytest.warns(RuntimeWarning, match="could not log the diagnostic"):
        d = inf.approx.diagnose(200, random_seed=1)
    assert dv.open_run(store).diagnosis == d.as_dict()


def test_a_jobs_run_names_the_model_the_data_and_the_shards_and_where_the_store_is(tmp_path, monkeypatch):
    """A config run with Parquet data and a relative store: the params say what was fitted on
    what, the store tag is absolute, and the loss curve is there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import write_config
    from distvi.cli import main

    root = Path(__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(root))  # the model: jobs.quickstart:model
    from jobs.quickstart import PREDICTORS, load

    monkeypatch.chdir(tmp_path)
    d = load(rows=600)
    pq.write_table(pa.table({**{k: d["X"][:, i] for i, k in enumerate(PREDICTORS)}, "morekids": d["y"]}),
                   "fertility.parquet")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = {"model": "jobs.quickstart:model", "method": "advi", "n": 20, "batch_size": 100,
           "optimizer": {"name": "adam", "learning_rate": 0.05},
           "data": {"kind": "parquet", "path": "fertility.parquet",
                    "columns": {"X": PREDICTORS, "y": "morekids"}},
           "num_workers": 2, "backend": "local", "progress": "off", "store": "runs/job.zarr",
           "tracking": {"experiment": "job", "tracking_uri": uri, "log_every": 10}}
    assert main(["run", write_config(tmp_path, cfg)]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    p = run.data.params
    assert p["model"] == "jobs.quickstart:model" and p["method"] == "ADVI"
    assert p["data.kind"] == "parquet" and p["data.path"] == str(tmp_path / "fertility.parquet")
    assert p["data.rows"] == "600" and p["data.columns"] == f"X=[{', '.join(PREDICTORS)}], y=morekids"
    assert p["inference.num_workers"] == "2"
    assert run.data.tags["distvi.store"] == str(tmp_path / "runs" / "job.zarr")
    assert "loss.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_loss_figure_has_a_title_a_symlog_axis_and_a_running_mean_over_the_raw_loss():
    from distvi.tracking import loss_figure, plot_title

    title = plot_title({"method": "ADVI", "model": "jobs.quickstart:model", "data": {"rows": 4000}})
    assert title == "ADVI on jobs.quickstart:model (4,000 rows)"
    rng = np.random.default_rng(0)
    hist = np.linspace(300.0, -40.0, 1000) + rng.normal(0.0, 5.0, 1000)  # a loss may go below 0
    (ax,) = loss_figure(hist, title).axes
    assert ax.get_title() == title and ax.get_yscale() == "symlog"
    raw, mean = ax.get_lines()
    np.testing.assert_array_equal(raw.get_ydata(), hist)
    w = 1000 // 50
    np.testing.assert_array_equal(mean.get_xdata(), np.arange(w, 1001))
    np.testing.assert_allclose(mean.get_ydata(), pd.Series(hist).rolling(w).mean().dropna(),
                               rtol=1e-9, atol=1e-9)
    (ax,) = loss_figure(hist[:30]).axes  # a short run: the mean is over 10 steps
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(),
                               pd.Series(hist[:30]).rolling(10).mean().dropna(), rtol=1e-9, atol=1e-9)
