"""The Ray backend on a real local cluster: same numbers as local, survives a killed worker."""

import os
import signal
import sys
import time

import numpy as np
import pytest

import distvi as dv
from distvi.backends.ray import ShardActor, WorkerError

from conftest import LinearRegression, free_port, wait_for_port, write_zarr

pytestmark = pytest.mark.usefixtures("ray_cluster")


def fit(lr, backend, n=120, data=None, method=dv.ADVI, **kw):
    """A short minibatch fit on two shards."""
    inf = method(model=lr.factory, data=lr.data if data is None else data, batch_size=40,
                 num_workers=2, backend=backend, random_seed=21, **kw)
    with inf:
        inf.fit(n, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    return inf


@pytest.fixture(scope="module")
def lr():
    return LinearRegression(n_rows=300, seed=5)


@pytest.fixture(scope="module")
def local_run(lr):
    return fit(lr, "local")


@pytest.fixture(scope="module")
def step_run(lr):
    """The local fit step by step: the same kernels as the Ray workers, so bit for bit."""
    return fit(lr, "local", backend_options={"fused": False})


@pytest.mark.parametrize("path", ["plain", "direct", "compiled"])
def test_ray_equals_local_for_the_same_seed_and_shards(lr, local_run, step_run, path):
    remote = fit(lr, "ray", backend_options={"path": path})
    # bit for bit the local backend's step-by-step fit (its fused blocks sum in another order)
    np.testing.assert_array_equal(remote.hist, step_run.hist)
    np.testing.assert_array_equal(remote.approx.mean, step_run.approx.mean)
    np.testing.assert_allclose(remote.hist, local_run.hist, rtol=1e-10)
    np.testing.assert_allclose(remote.approx.mean, local_run.approx.mean, rtol=1e-10)


def test_ray_equals_local_fullrank_from_zarr(lr, tmp_path):
    path = write_zarr(tmp_path / "lr.zarr", lr.data, chunk_rows=50)
    remote = fit(lr, "ray", n=60, data=dv.data.ZarrSource(path), method=dv.FullRankADVI)
    local = fit(lr, "local", n=60, method=dv.FullRankADVI)
    np.testing.assert_allclose(remote.hist, local.hist, rtol=1e-10)
    np.testing.assert_allclose(remote.approx.cov, local.approx.cov, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("path", ["plain", "direct", "compiled"])
def test_a_killed_worker_changes_nothing(lr, step_run, path):
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                  random_seed=21, backend_options={"path": path})
    killed = []

    def kill_worker_one(approx, losses, i):
        if i == 50:
            pid = inf._backend.pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with inf:
        inf.fit(120, obj_optimizer=dv.adam(learning_rate=0.05), callbacks=[kill_worker_one],
                progressbar=False)
        assert inf._backend.pids()[1] != killed[0]  # a new process took over
        assert inf._backend.fast_path == (None if path == "plain" else path)  # opened again
    np.testing.assert_array_equal(inf.hist, step_run.hist)
    np.testing.assert_array_equal(inf.approx.mean, step_run.approx.mean)


class HangsAtStepFive(ShardActor):
    def evaluate(self, points, step, with_logp=True):
        if step == 5 and self.worker.rank == 1:
            time.sleep(30)
        return super().evaluate(points, step, with_logp)


@pytest.mark.parametrize("path", ["plain", "direct", "compiled"])
def test_a_hung_worker_is_named_and_the_last_good_parameters_kept(lr, path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                  random_seed=21, backend_options={"timeout_s": 3.0, "path": path,
                                                   "actor_class": HangsAtStepFive})
    seen = []
    with inf, pytest.raises(WorkerError, match=r"worker\(s\) \[1\] did not answer step 5"):
        inf.fit(20, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False,
                callbacks=[lambda approx, losses, i: seen.append(approx.mean.copy())])
    assert len(inf.hist) == 5
    np.testing.assert_array_equal(inf.approx.mean, seen[-1])


class NoLine(ShardActor):
    def listen(self, token, host=None):
        return ("127.0.0.1", 1)  # nothing listens there: the direct path cannot open


def test_a_direct_path_that_cannot_open_falls_back_or_fails_as_asked(lr, local_run):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    auto = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                   random_seed=21, backend_options={"actor_class": NoLine})
    with auto, pytest.warns(RuntimeWarning, match="direct path to the workers is unavailable"):
        auto.fit(120, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
        assert auto._backend.path == "plain" and auto._backend.fast_path is None
    np.testing.assert_allclose(auto.approx.mean, local_run.approx.mean, rtol=1e-10)
    with pytest.raises(WorkerError, match="could not open the direct path .* could not connect"):
        fit(lr, "ray", n=5, backend_options={"actor_class": NoLine, "path": "direct"})


def test_where_ray_uses_tls_auto_steps_over_plain_calls(lr, step_run, monkeypatch):
    """The direct path is not encrypted: with Ray's TLS on, ``"auto"`` keeps to Ray's calls."""
    from distvi.backends import ray as ray_backend
    from distvi.backends.ray_cluster import ray_tls

    for value, on in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("RAY_USE_TLS", value)
        assert ray_tls() is on
    monkeypatch.delenv("RAY_USE_TLS")  # the session's Ray connection stays as it is
    monkeypatch.setattr(ray_backend, "ray_tls", lambda: True)
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                  random_seed=21)
    with inf:
        inf.fit(120, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
        assert inf._backend.path == "plain" and inf._backend.fast_path is None
    np.testing.assert_array_equal(inf.approx.mean, step_run.approx.mean)


def test_placement_that_cannot_be_met_fails_clearly(lr):
    inf = dv.ADVI(model=lr.factory, data=lr.data, num_workers=2, backend="ray",
                  backend_options={"num_cpus": 8, "placement_timeout_s": 2})
    with pytest.raises(WorkerError, match="could not place 2 workers"):
        inf.fit(5, progressbar=False)


def test_exhausted_restarts_give_a_clear_error(lr):
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                  random_seed=21, backend_options={"max_restarts": 0, "path": "plain"})

    def kill(approx, losses, i):
        if i == 3:
            os.kill(inf._backend.pids()[0], signal.SIGKILL)

    with inf, pytest.raises(WorkerError, match="worker 0 died at step 3: 1 worker failures .* exceed the restart budget of max_restarts=0"):
        inf.fit(10, progressbar=False, callbacks=[kill])
    assert len(inf.hist) == 3 and np.all(np.isfinite(inf.approx.mean))


JOIN_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import numpy as np
import distvi as dv
from conftest import LinearRegression
lr = LinearRegression(n_rows=300, seed=5)
inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
              random_seed=21, backend_options={{"num_cpus": 0.5}})
with inf:
    inf.fit(120, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
import ray
print(json.dumps({{"mean": inf.approx.mean.tolist(), "still_connected": ray.is_initialized()}}))
"""


def test_joins_a_cluster_started_with_ray_start_and_leaves_it_running(lr, local_run, tmp_path):
    import json
    import subprocess

    import shutil
    import tempfile

    port = free_port()
    short_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths: <= 107 bytes
    # no 30 s drain on SIGTERM: the cluster stops in seconds
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={short_dir}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        try:
            wait_for_port(port, 90)
        except TimeoutError:
            raise AssertionError((tmp_path / "head.log").read_text()[-1200:]) from None
        script = JOIN_SCRIPT.format(tests=os.path.dirname(__file__))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        np.testing.assert_allclose(result["mean"], local_run.approx.mean, rtol=1e-10)
        assert head.poll() is None  # the cluster distvi joined is still running
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(short_dir, ignore_errors=True)


def test_an_inference_dropped_without_close_releases_its_actors(lr):
    import gc

    import ray
    from ray.exceptions import RayActorError

    inf = dv.ADVI(model=lr.factory, data=lr.data, num_workers=2, backend="ray",
                  backend_options={"num_cpus": 0.5})
    inf.fit(2, progressbar=False)
    actors = list(inf._backend.actors)
    del inf
    gc.collect()
    for actor in actors:
        with pytest.raises(RayActorError):
            ray.get(actor.pid.remote(), timeout=60)
