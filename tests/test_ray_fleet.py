"""Ray workers over a process's life: fits that take turns on the cluster's CPUs, and a long
run that loses workers again and again."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import distvi as dv
from distvi.backends.base import WorkerError
from distvi.backends.ray import ShardActor
from distvi.backends.ray_fleet import RestartBudget

from conftest import LinearRegression

pytestmark = pytest.mark.usefixtures("ray_cluster")
ADAM = dict(obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)


@pytest.fixture(scope="module")
def lr():
    return LinearRegression(n_rows=300, seed=5)


def advi(lr, backend, method=dv.ADVI, workers=2, **options):
    return method(model=lr.factory, data=lr.data, batch_size=30, num_workers=workers,
                  backend=backend, random_seed=8, backend_options=options or None)


def test_the_budget_counts_failures_in_a_window_of_steps():
    budget = RestartBudget(2, window=100)
    for step in range(0, 1500, 60):  # one failure every 60 steps: never 3 within 100
        budget.record(step, 0, "died")
    assert budget.total == 25
    with pytest.raises(WorkerError, match=r"worker 1 died at step 1450: 3 worker failures within "
                                          r"71 steps \(steps 1380-1450; 26 since the workers "
                                          r"started\).*max_restarts=2 per restart_window=100"):
        budget.record(1450, 1, "died")
    with pytest.raises(ValueError, match="restart_window must be at least 1"):
        RestartBudget(3, 0)
    with pytest.raises(ValueError, match=r"backend_options\['restart_window'\] must be an int >= 1"):
        advi(LinearRegression(n_rows=20), "ray", restart_window=0)


def test_a_second_fit_takes_an_idle_fits_workers_and_both_keep_their_numbers(lr, capfd):
    # references: the same fits with the workers kept throughout (local: the same numbers)
    ref_first = advi(lr, "local", fused=False)
    ref_first.fit(60, **ADAM)
    ref_first.refine(40, progressbar=False)
    ref_second = advi(lr, "local", dv.FullRankADVI, fused=False)
    ref_second.fit(60, **ADAM)

    first = advi(lr, "ray")  # 2 workers x 1 CPU: the whole 2-CPU cluster
    second = advi(lr, "ray", dv.FullRankADVI)
    try:
        first.fit(60, **ADAM)
        capfd.readouterr()
        second.fit(60, **ADAM)  # does not wait: the idle first one lets its workers go
        notice = capfd.readouterr().err
        assert "distvi: released the 2 idle Ray workers of the ADVI fit to make room" in notice
        assert first._backend.released and not first._backend.actors
        first.refine(40, progressbar=False)  # starts its workers again (taking the second's)
        assert "released the 2 idle Ray workers of the FullRankADVI fit" in capfd.readouterr().err
    finally:
        first.close()
        second.close()
    np.testing.assert_array_equal(first.hist, ref_first.hist)
    np.testing.assert_array_equal(first.approx.mean, ref_first.approx.mean)
    np.testing.assert_array_equal(second.approx.mean, ref_second.approx.mean)


def test_a_full_cluster_says_who_holds_it_and_what_to_do(lr):
    first = advi(lr, "ray")
    seen = []

    def start_another(approx, losses, i):
        if i == 5:  # the first fit is running: its workers are not idle
            with pytest.raises(WorkerError) as err:
                advi(lr, "ray", dv.FullRankADVI).fit(10, **ADAM)
            seen.append(str(err.value))

    with first:
        first.fit(10, callbacks=[start_another], **ADAM)
    message = seen[0]
    assert "could not place 2 workers with 1 CPU each: the cluster has 2 CPUs" in message
    assert "the ADVI fit holds 2 (2 workers, in a fit now)" in message
    assert "close()" in message and "with inference:" in message and "num_workers" in message


def test_a_worker_killed_every_100_steps_changes_nothing(lr):
    """Fourteen deaths over 1,500 steps (three workers): within the default budget of
    3 failures per 100 steps, and the numbers are the uninterrupted fit's."""
    reference = advi(lr, "local", workers=3, fused=False)
    reference.fit(1500, **ADAM)
    inf = advi(lr, "ray", workers=3, num_cpus=0.5, path="plain")
    killed = []
    rng = np.random.default_rng(3)

    def kill_one(approx, losses, i):
        if i % 100 == 0 and i < 1500:
            rank = int(rng.integers(3))
            os.kill(inf._backend.pids()[rank], signal.SIGKILL)
            killed.append(rank)

    with inf:
        inf.fit(1500, callbacks=[kill_one], **ADAM)
        assert inf._backend.budget.total == len(killed) == 14
    np.testing.assert_array_equal(inf.hist, reference.hist)
    np.testing.assert_array_equal(inf.approx.mean, reference.approx.mean)


GIVES_UP = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import distvi as dv
from conftest import LinearRegression
lr = LinearRegression(n_rows=300, seed=5)
inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=30, num_workers=2, backend="ray",
              random_seed=8, backend_options={{"max_restarts": 1, "restart_window": 1000,
                                               "num_cpus": 0.5, "path": "compiled"}})
def kill(approx, losses, i):
    if i in (20, 40):
        os.kill(inf._backend.pids()[0], signal.SIGKILL)
inf.fit(100, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False, callbacks=[kill],
        store={store!r}, checkpoint_every=1000)
"""


def test_failures_faster_than_the_budget_end_clearly_with_a_checkpoint(tmp_path, ray_cluster):
    script = tmp_path / "job.py"
    store = tmp_path / "run.zarr"
    script.write_text(GIVES_UP.format(tests=str(Path(__file__).parent), store=str(store)))
    address = ray_cluster.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # an exception, not a crash at exit
    assert "WorkerError: worker 0 died at step 40: 2 worker failures within 21 steps" in proc.stderr
    assert "max_restarts=1 per restart_window=1000 steps" in proc.stderr
    assert "Segmentation fault" not in proc.stderr and "core dumped" not in proc.stderr
    run = dv.open_run(str(store))
    assert run.checkpoint.step == 40  # the steps before the failure are kept
    np.testing.assert_array_equal(run.traces["step"], np.arange(1, 41))


class CannotStart(ShardActor):
    def __init__(self, spec, rank, *args):
        if rank == 1:
            raise RuntimeError("shard 1 is not readable here")
        super().__init__(spec, rank, *args)


def test_a_worker_that_cannot_start_ends_the_start_with_its_error(lr):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inf = advi(lr, "ray", actor_class=CannotStart)
    with inf, pytest.raises(WorkerError, match="(?s)worker 1 died while starting .*RuntimeError: shard 1 is not readable here"):
        inf.fit(10, **ADAM)
    assert inf._backend is None or not inf._backend.actors  # nothing is left holding CPUs



class SlowStart(ShardActor):
    def __init__(self, spec, rank, *args):
        if rank == 1:
            import time

            time.sleep(60)
        super().__init__(spec, rank, *args)


def test_a_worker_that_does_not_start_in_time_is_named(lr):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # worker 0 has 8 s to start (seconds on a loaded 2-core machine); worker 1 sleeps for 60
    inf = advi(lr, "ray", actor_class=SlowStart, timeout_s=3.0, startup_timeout_s=8.0)
    with inf, pytest.raises(WorkerError, match=r"worker\(s\) \[1\] did not start \(load the shard "
                                               r"and compile\) within 8 s"):
        inf.fit(10, **ADAM)
    assert inf._backend is None or not inf._backend.actors  # nothing is left holding CPUs


class DiesOnListen(ShardActor):
    def listen(self, token, host=None):
        os._exit(1)  # every worker, and every replacement, dies as the direct path opens


def test_a_restart_budget_spent_while_the_direct_path_opens_ends_the_fit_with_its_error(lr):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    import warnings

    inf = advi(lr, "ray", actor_class=DiesOnListen, max_restarts=1)
    with inf, warnings.catch_warnings(record=True) as seen, pytest.raises(
            WorkerError, match="worker failures .* exceed the restart budget of max_restarts=1"):
        warnings.simplefilter("always")
        inf.fit(10, **ADAM)
    # the budget's error at once, not a fallback to plain calls on workers that are gone
    assert not [w for w in seen if "direct path" in str(w.message)]
    assert inf._backend is None or not inf._backend.actors  # nothing is left holding CPUs

OWN_RAY_JOB = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import ray
    import distvi as dv
    from distvi.backends.base import WorkerError
    from conftest import LinearRegression

    lr = LinearRegression(n_rows=300, seed=5)

    def fit(**kw):
        inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=30, num_workers=2, backend="ray",
                      random_seed=8, **kw)
        with inf:
            return np.asarray(inf.fit(40, obj_optimizer=dv.adam(learning_rate=0.05),
                                      progressbar=False).mean).tolist()

    out = {{}}
    try:
        fit(address="127.0.0.1:1")
    except WorkerError as err:
        out["no_cluster"] = str(err)
    out["up_after_refusal"] = ray.is_initialized()
    out["first"] = fit()
    ray.shutdown()  # the program's own, between two fits
    out["second"] = fit()
    print(json.dumps(out))
""")


def test_a_background_join_reports_its_error_and_a_fit_after_the_programs_ray_shutdown_starts_ray_again(tmp_path):
    """Ray is joined in a background thread: a cluster that does not answer is the fit's
    error; after the program shut Ray down itself, the next fit starts a new local instance
    (whose processes live as long as the thread that started it) with the same numbers."""
    import json

    script = tmp_path / "own_ray.py"
    script.write_text(OWN_RAY_JOB.format(tests=str(Path(__file__).parent)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "no Ray cluster answers at 127.0.0.1:1" in out["no_cluster"]
    assert out["up_after_refusal"] is False
    assert out["second"] == out["first"]
