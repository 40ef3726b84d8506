"""Shared fixtures and helpers: small real models with closed-form posteriors, Zarr data on
disk, local ports, a ``ray start`` head's clean stop, and a live ``mlflow server``.

Test modules share code only through this file (``from conftest import ...``), never by
importing one another: importing a test module runs its module-level setup and collects its
tests a second time under another name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pymc as pm
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_quiet_ray: checks output that stays clean only once distvi silences "
                   "Ray's own log lines (backends/ray.py)")


class LinearRegression:
    """Bayesian linear regression with known noise: w ~ N(0, tau^-1 I), y ~ N(X w, sigma^2).

    The posterior is N(mean, cov) in closed form, and so is the log evidence.
    """

    def __init__(self, n_rows: int = 400, n_coef: int = 3, sigma: float = 1.0, tau: float = 1.0,
                 correlated: bool = False, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(n_rows, n_coef))
        if correlated:
            X[:, 1] = 0.8 * X[:, 0] + 0.6 * X[:, 1]
        w = rng.normal(size=n_coef)
        y = X @ w + sigma * rng.normal(size=n_rows)
        self.X, self.y, self.sigma, self.tau = X, y, sigma, tau
        prec = tau * np.eye(n_coef) + X.T @ X / sigma**2
        self.cov = np.linalg.inv(prec)
        self.mean = self.cov @ X.T @ y / sigma**2
        self.data = {"X": X, "y": y}
        # y ~ N(0, X X'/tau + sigma^2 I), through the d x d matrix (determinant lemma and
        # Woodbury) so that large n_rows stay cheap
        inner = tau * sigma**2 * np.eye(n_coef) + X.T @ X
        logdet = n_rows * np.log(sigma**2) + np.linalg.slogdet(inner)[1] - n_coef * np.log(tau * sigma**2)
        Xty = X.T @ y
        quad = (y @ y - Xty @ np.linalg.solve(inner, Xty)) / sigma**2
        self.log_evidence = -0.5 * (quad + logdet + n_rows * np.log(2 * np.pi))

    def factory(self, data):
        sigma, tau = self.sigma, self.tau
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0 / np.sqrt(tau), shape=self.X.shape[1])
            pm.Normal("y", data["X"] @ w, sigma, observed=data["y"])
        return m


@pytest.fixture(scope="session")
def linreg() -> LinearRegression:
    return LinearRegression()


def logistic_factory(data):
    with pm.Model(coords={"coef": [f"x{i}" for i in range(3)]}) as m:
        w = pm.Normal("w", 0.0, 1.0, dims="coef")
        b = pm.Normal("b", 0.0, 2.0)
        s = pm.HalfNormal("s", 1.0)
        pm.Deterministic("w_scaled", w * s, dims="coef")
        pm.Bernoulli("y", logit_p=data["X"] @ w + b, observed=data["y"])
    return m


@pytest.fixture(scope="session")
def logistic_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 3))
    y = (rng.random(600) < 1 / (1 + np.exp(-(X @ [1.0, -1.0, 0.5] + 0.3)))).astype("int64")
    return {"X": X, "y": y}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (auth off only here, in tests)."""
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------- data on disk
def write_zarr(path, arrays, chunk_rows=100):
    """``arrays`` (name -> array, rows first) as a Zarr group at ``path``; returns the path."""
    import zarr

    g = zarr.open_group(str(path), mode="w")
    for k, v in arrays.items():
        g.create_array(k, data=v, chunks=(chunk_rows, *v.shape[1:]))
    return str(path)


@pytest.fixture
def at_repo_root(monkeypatch):
    """The repository root as the working directory: configs' jobs.* references resolve."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)


def write_config(tmp_path, cfg, name="c.yaml"):
    """A config (a dict, dumped as YAML, or YAML text) written to ``tmp_path / name``."""
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    return str(path)


# ---------------------------------------------------------------------------- local ports
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(k: int) -> list[int]:
    """``k`` distinct free ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


# ---------------------------------------------------------------------------- ray start --head
def pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (a cluster's unique temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


def stop_ray_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to ``ray start --block`` stops the processes it started (draining is off, so
    at once); anything of this cluster still alive after that is killed by pid."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    deadline = time.monotonic() + 10
    while pids_using(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- mlflow server
class MlflowServer:
    """``mlflow server`` in its own process group, with a SQLite backend and proxied artifacts."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.db, self.artifacts = root, root / "srv.db", root / "artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        # the job runner (a second process) is not needed here and slows the start
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.db}",
                 "--artifacts-destination", str(self.artifacts)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        tail = self.log.read_text()[-2000:]
        self.stop()
        raise AssertionError(f"mlflow server did not become healthy in {timeout_s} s:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the CLI and its uvicorn child)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        end = time.monotonic() + 10  # the child may outlive the CLI for a moment
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever is left of the group


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live ``mlflow server`` per test module (module scope: its runs are that module's)."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()
