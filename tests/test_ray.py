"""The Ray backend on a real local cluster: same numbers as local, survives a killed worker."""

import os
import signal
import sys
import time

import numpy as np
import pytest

import distvi as dv
from distvi.backends.ray import ShardActor, WorkerError

from conftest import LinearRegression
from test_data import write_zarr

pytestmark = pytest.mark.usefixtures("ray_cluster")


def fit(lr, backend, n=120, data=None, method=dv.ADVI, **kw):
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


def test_ray_equals_local_for_the_same_seed_and_shards(lr, local_run):
    remote = fit(lr, "ray")
    np.testing.assert_allclose(remote.hist, local_run.hist, rtol=1e-10)
    np.testing.assert_allclose(remote.approx.mean, local_run.approx.mean, rtol=1e-10)


def test_ray_equals_local_fullrank_from_zarr(lr, tmp_path):
    path = write_zarr(tmp_path / "lr.zarr", lr.data, chunk_rows=50)
    remote = fit(lr, "ray", n=60, data=dv.data.ZarrSource(path), method=dv.FullRankADVI)
    local = fit(lr, "local", n=60, method=dv.FullRankADVI)
    np.testing.assert_allclose(remote.hist, local.hist, rtol=1e-10)
    np.testing.assert_allclose(remote.approx.cov, local.approx.cov, rtol=1e-10, atol=1e-14)


def test_a_killed_worker_changes_nothing(lr, local_run):
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                  random_seed=21)
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
    np.testing.assert_array_equal(inf.hist, local_run.hist)
    np.testing.assert_array_equal(inf.approx.mean, local_run.approx.mean)


class HangsAtStepFive(ShardActor):
    def evaluate(self, points, step):
        if step == 5 and self.worker.rank == 1:
            time.sleep(30)
        return super().evaluate(points, step)


def test_a_hung_worker_is_named_and_the_last_good_parameters_kept(lr):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=40, num_workers=2, backend="ray",
                  random_seed=21,
                  backend_options={"timeout_s": 3.0, "actor_class": HangsAtStepFive})
    seen = []
    with inf, pytest.raises(WorkerError, match=r"worker\(s\) \[1\] did not answer step 5"):
        inf.fit(20, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False,
                callbacks=[lambda approx, losses, i: seen.append(approx.mean.copy())])
    assert len(inf.hist) == 5
    np.testing.assert_array_equal(inf.approx.mean, seen[-1])


def test_placement_that_cannot_be_met_fails_clearly(lr):
    inf = dv.ADVI(model=lr.factory, data=lr.data, num_workers=2, backend="ray",
                  backend_options={"num_cpus": 8, "placement_timeout_s": 2})
    with pytest.raises(WorkerError, match="could not place 2 workers"):
        inf.fit(5, progressbar=False)
