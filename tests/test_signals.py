"""SIGINT and SIGTERM during a fit: a stop at a step boundary, a final checkpoint, the MLflow
run closed as KILLED, and only the Ray instance distvi started shut down.

The signal is sent by a callback to its own process, so it arrives at a known step; the
handler only notes it, and the loop stops at the end of that step."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import distvi as dv
from distvi.store import RunStore, StoreError

ROOT = Path(__file__).resolve().parent.parent


def send_at(step_wanted, signum):
    def cb(approx, losses, step):
        if step == step_wanted:
            os.kill(os.getpid(), signum)
    cb.call_every = 1  # seen at every step, through fused blocks: the same path as the fit compared
    return cb


def run_status(uri, store):
    return MlflowClient(uri).get_run(RunStore.open(store).attrs["mlflow_run_id"]).info.status


def test_sigint_stops_at_the_step_boundary_with_a_checkpoint_and_a_killed_run(tmp_path, linreg, capfd):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = str(tmp_path / "run.zarr")
    opt = dict(obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=50, random_seed=3)
    approx = inference.fit(80, store=store, checkpoint_every=1000, callbacks=[send_at(37, signal.SIGINT)],
                           tracking=dv.MLflowTracking(tracking_uri=uri, min_interval_s=0), **opt)
    assert approx is inference.approx and inference.interrupted == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert inference.state.step == 37 and len(inference.hist) == 37
    assert "SIGINT received: the fit stopped after step 37" in capfd.readouterr().err
    run = dv.open_run(store)
    assert run.status == "interrupted" and run.checkpoint.step == 37
    np.testing.assert_array_equal(run.traces["step"], np.arange(1, 38))
    np.testing.assert_array_equal(run.checkpoint.params[0], inference.state.params[0])
    with pytest.raises(StoreError, match="no posterior draws"):
        run.posterior()  # an interrupted run's result is its checkpoint
    assert run_status(uri, store) == "KILLED"
    # resumed, it ends where an uninterrupted run ends
    resumed = dv.resume(store, model=linreg.factory, data=linreg.data, progressbar=False)
    straight = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=50, random_seed=3)
    straight.fit(80, **opt)
    np.testing.assert_array_equal(resumed.params_values[0], straight.approx.params_values[0])
    assert dv.open_run(store).status == "finished"


def test_sigint_on_a_ray_fit_releases_the_actors_but_not_a_ray_it_did_not_start(ray_cluster, linreg):
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, num_workers=2, backend="ray",
                        batch_size=50, random_seed=3)
    inference.fit(60, callbacks=[send_at(12, signal.SIGINT)], progressbar=False)
    assert inference.interrupted == "SIGINT" and inference.state.step == 12
    assert inference._backend is None  # the actors are released
    assert ray_cluster.is_initialized()  # the session's Ray instance is not distvi's to stop
    straight = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=50, num_workers=2,
                       backend="local", random_seed=3)
    straight.fit(12, progressbar=False)
    np.testing.assert_allclose(inference.approx.mean, straight.approx.mean, rtol=1e-12)


def test_a_second_sigint_does_not_wait_and_records_nothing_of_the_torn_step(linreg, tmp_path):
    """The first SIGINT asks for a stop at the step's end; a second one, still inside the step,
    raises at once: the fit leaves by KeyboardInterrupt, the store keeps its last committed
    checkpoint (not the state of the interrupted step) and is marked interrupted."""
    store = str(tmp_path / "run.zarr")
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=50, random_seed=3)
    later = []

    def twice(approx, losses, step):
        if step == 25:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            later.append(step)  # not reached: the second signal raised

    with pytest.raises(KeyboardInterrupt):
        inference.fit(50, store=store, checkpoint_every=10, callbacks=[twice], progressbar=False)
    assert later == [] and inference.interrupted == "SIGINT" and inference._backend is None
    run = dv.open_run(store)
    assert run.status == "interrupted" and run.checkpoint.step == 20
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


SIGTERM_JOB = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import ray
    import distvi as dv
    from conftest import LinearRegression

    lr = LinearRegression()
    seen = {{}}

    def cb(approx, losses, step):
        if step == 30:
            node = ray._private.worker._global_node
            seen["pids"] = [p.process.pid for ps in node.all_processes.values() for p in ps]
            seen["session"] = node.get_session_dir_path()
            with open({pids!r}, "w") as f:
                json.dump(seen, f)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        dv.fit(200, model=lr.factory, data=lr.data, num_workers=2, batch_size=50, random_seed=2,
               store={store!r}, checkpoint_every=1000, callbacks=[cb], progressbar=False,
               tracking=dv.MLflowTracking(tracking_uri={uri!r}, min_interval_s=0))
    finally:
        print("ray initialized at exit:", ray.is_initialized(), flush=True)
    print("not reached", flush=True)
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """A job script in its own process: distvi starts local Ray (token auth on, as Ray does by
    default; HOME is a temporary directory, so the token file is the test's own), and the job
    gets SIGTERM at step 30."""
    tmp = tmp_path_factory.mktemp("sigterm")
    home = tmp / "home"
    home.mkdir()
    paths = {"tests": str(ROOT / "tests"), "pids": str(tmp / "pids.json"),
             "store": str(tmp / "run.zarr"), "uri": f"sqlite:///{tmp}/mlflow.db"}
    script = tmp / "job.py"
    script.write_text(SIGTERM_JOB.format(**paths))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, paths, home


def test_sigterm_checkpoints_kills_the_mlflow_run_and_stops_the_ray_it_started(sigterm_run):
    import json

    proc, paths, home = sigterm_run
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "SIGTERM received: the fit stopped after step 30" in proc.stderr
    assert "ray initialized at exit: False" in proc.stdout and "not reached" not in proc.stdout
    run = dv.open_run(paths["store"])
    assert run.status == "interrupted" and run.checkpoint.step == 30
    np.testing.assert_array_equal(run.traces["step"], np.arange(1, 31))
    assert run_status(paths["uri"], paths["store"]) == "KILLED"
    seen = json.loads(Path(paths["pids"]).read_text())
    assert seen["pids"]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in seen["pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in seen["pids"] if _alive(p)], "Ray processes distvi started outlived the job"


def test_the_ray_token_distvi_creates_is_private_and_never_written_out(sigterm_run):
    """Ray turns token auth on for the local instance distvi starts; the token file is the
    owner's alone, and the token is in nothing distvi printed or wrote."""
    proc, paths, home = sigterm_run
    token_file = home / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (home / ".ray").stat().st_mode & 0o077 == 0
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert token not in proc.stdout + proc.stderr
    tmp = Path(paths["store"]).parent
    leaks = [str(p) for p in tmp.rglob("*") if p.is_file() and p != token_file
             and token.encode() in p.read_bytes()]
    assert leaks == []  # the run store, the MLflow database and artifacts


def test_sigterm_goes_to_the_handler_the_program_had_after_the_clean_stop(linreg, tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        inference = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=50, random_seed=3)
        inference.fit(40, store=str(tmp_path / "run.zarr"), callbacks=[send_at(9, signal.SIGTERM)],
                      progressbar=False)
        assert calls == [signal.SIGTERM]  # once, after the checkpoint
        assert inference.interrupted == "SIGTERM" and inference.state.step == 9
        assert dv.open_run(str(tmp_path / "run.zarr")).checkpoint.step == 9
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_sigterm_action_ray_sets_off_the_main_thread_is_set_back():
    """``ray.init`` in a background thread puts Ray's crash handler in front of the
    program's SIGTERM handler at the C level (Python cannot set its own back off the main
    thread); distvi keeps the action from before and sets it back from that thread."""
    import ctypes
    import threading

    from distvi.backends.ray_cluster import set_sigterm_action, sigterm_action

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))

    def delivered() -> bool:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(seen)

    def in_thread(fn):
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    try:
        kept = sigterm_action()
        assert kept is not None
        libc = ctypes.CDLL(None)
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        in_thread(lambda: libc.signal(int(signal.SIGTERM), 1))  # another action: SIG_IGN
        assert not delivered()  # the Python handler is still set, but the kernel ignores it
        in_thread(lambda: set_sigterm_action(kept))
        assert delivered() and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)
