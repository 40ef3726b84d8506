"""A real Ray Jobs submission: jobs/scale.py submitted to a cluster of its own, through the
dashboard's job API, with the checkout as the job's working directory.

The test starts its own head node (``ray start --head --block`` with its own ports and a short
temp dir) and stops it at the end, so the session's ``ray_cluster`` (a plain ``ray.init``
other tests share) is neither used nor disturbed. The job's driver joins this cluster through
``RAY_ADDRESS``, which Ray sets inside a job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_ports, stop_ray_head

ROOT = Path(__file__).resolve().parent.parent
N_STEPS = 100
EXCLUDES = [".venv", "runs", ".git", "*.db", "mlruns", "mlartifacts", "benchmarks/data",
            "__pycache__", ".pytest_cache", "*.egg-info"]


PORT_FLAGS = ["port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port",
              "node-manager-port", "object-manager-port"]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A head node with the dashboard (the job API) on free local ports; yields its URL."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # this process talks to the job API
    # every port given: another cluster on this machine (the session's) holds the defaults
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # unix socket paths: <= 107 bytes
    venv_bin = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, not after 30 s
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),  # the job's `python` is this env's
    })
    log = tmp_path / "head.log"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        head = subprocess.Popen(
            [os.path.join(venv_bin, "ray"), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             *[f"--{flag}={port}" for flag, port in ports.items()]],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited with {head.returncode}:\n"
                                     f"{log.read_text()[-3000:]}")
            try:
                JobSubmissionClient(url).get_version()
                break
            except Exception as err:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no job API at {url} after 120 s ({err}):\n"
                                         f"{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        stop_ray_head(head, temp_dir)


@pytest.mark.timeout(420)
def test_scale_job_submitted_through_the_job_api_records_a_store_and_an_mlflow_run(ray_head, tmp_path):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    import distvi as dv

    store = tmp_path / "s.zarr"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = JobSubmissionClient(ray_head)
    job_id = client.submit_job(
        entrypoint=(f"python jobs/scale.py --rows 20000 --cols 5 --chunk-rows 5000 "
                    f"--data-path {tmp_path / 'd.zarr'} --config configs/scale_cluster.yaml "
                    f"--set n={N_STEPS} --set checkpoint_every=50 --set store={store} "
                    f"--set tracking.tracking_uri={uri} --set tracking.log_every=1"),
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES},
    )
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + 300
    status = client.get_job_status(job_id)
    while status not in terminal and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if status not in terminal:
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-6000:]}"

    # the driver joined this cluster (RAY_ADDRESS), not a local instance of its own
    assert "Started a local Ray instance" not in logs, logs[-3000:]
    assert "Connecting to existing Ray cluster" in logs, logs[-3000:]
    assert "accuracy    max |q mean - true|" in logs and "rows/s" in logs, logs[-3000:]

    run = dv.open_run(str(store))
    assert run.status == "finished"
    assert run.traces["loss"].shape == (N_STEPS,)
    assert run.data["n_rows"] == 20000 and len(run.data["shards"]) == 2
    assert run.checkpoint is not None and run.checkpoint.step == N_STEPS

    mlflow = MlflowClient(tracking_uri=uri)
    experiment = mlflow.get_experiment_by_name("distvi-scale")
    assert experiment is not None
    runs = mlflow.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # MLflow gets the loss at the end of each log_every window: with log_every=1, every step's
    history = sorted(mlflow.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, N_STEPS + 1))
    np.testing.assert_allclose([m.value for m in history], run.traces["loss"], rtol=1e-12)
