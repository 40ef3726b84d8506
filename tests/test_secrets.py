"""Secrets and exposure: credentials in tracking URIs never reach the run store, MLflow,
warnings or the output; a token-protected Ray cluster refuses a client without its token
with a clear error; what the README starts listens on 127.0.0.1."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import distvi as dv
from distvi.cli import main
from distvi.redact import redact, redact_obj, strip_credentials, strip_masked
from distvi.store import RunStore, StoreError

from conftest import free_port, stop_ray_head, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "S3cr3t-pw"


@pytest.mark.parametrize("text, want", [
    (f"http://alice:{SECRET}@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    (f"see https://bob:{SECRET}@host/api/2.0/x failed", "see https://bob:***@host/api/2.0/x failed"),
    (f"s3://KEY:{SECRET}@bucket/run.zarr and gs://u:{SECRET}@b", "s3://KEY:***@bucket/run.zarr and gs://u:***@b"),
    (f"'postgresql://u:p@ss{SECRET}@db:5432/mlflow'", "'postgresql://u:***@db:5432/mlflow'"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    (f"https://alice@corp.com:{SECRET}@host/x", "https://alice@corp.com:***@host/x"),
    (f"https://{SECRET}@host/x", "https://***@host/x"),
    (f"https://acct.example/c?sv=1&sig={SECRET}&X-Amz-Signature={SECRET}#f",
     "https://acct.example/c?sv=1&sig=***&X-Amz-Signature=***#f"),
    ("http://127.0.0.1:5000 user@example.org", "http://127.0.0.1:5000 user@example.org"),
])
def test_redact_hides_the_password_of_every_url(text, want):
    assert redact(text) == want
    assert redact_obj({"a": [text, {text: 1}]}) == {"a": [want, {want: 1}]}


def test_strip_credentials():
    assert strip_credentials("https://alice:***@h:1/p") == "https://h:1/p"
    assert strip_credentials("sqlite:///x.db") == "sqlite:///x.db"
    job = redact_obj({"tracking": {"tracking_uri": f"https://a:{SECRET}@h"},
                      "data": {"path": [f"sftp://u:{SECRET}@h/d.zarr", "local.zarr"]}})
    assert strip_masked(job) == {"tracking": {"tracking_uri": "https://h"},
                                 "data": {"path": ["sftp://h/d.zarr", "local.zarr"]}}


def test_store_errors_never_carry_a_password():
    with pytest.raises(StoreError) as err:
        RunStore.open(f"s3://KEY:{SECRET}@127.0.0.1:1/nothing.zarr")
    assert SECRET not in str(err.value) and "KEY:***@" in str(err.value)


def test_an_unreachable_tracking_server_warns_without_the_password(linreg, tmp_path):
    tracking = dv.MLflowTracking(tracking_uri=f"http://bob:{SECRET}@127.0.0.1:1", experiment="x")
    with pytest.warns(RuntimeWarning, match="MLflow tracking stopped") as caught:
        dv.fit(5, model=linreg.factory, data=linreg.data, progressbar=False, tracking=tracking,
               store=str(tmp_path / "run.zarr"))
    assert all(SECRET not in str(w.message) for w in caught)
    assert SECRET not in Path(tmp_path / "run.zarr" / "zarr.json").read_text()


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_tracking_credentials_are_redacted_everywhere_and_resume_still_logs(server, tmp_path, capfd,
                                                                           monkeypatch):
    monkeypatch.chdir(ROOT)
    store = tmp_path / "run.zarr"
    uri = server.url.replace("http://", f"http://alice:{SECRET}@")
    cfg = {"model": "jobs.quickstart:model",
           "data": {"kind": "loader", "loader": "jobs.quickstart:load", "options": {"rows": 500}},
           "n": 30, "backend": "local", "progress": "lines", "store": str(store), "seed": 1,
           "tracking": {"tracking_uri": uri, "experiment": "secrets", "log_every": 10}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    assert main(["resume", str(store), "--n", "40"]) == 0
    assert main(["summary", str(store)]) == 0
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err
    assert "alice:***@" in out.out  # where the UI is, without the password
    assert files_containing(store, SECRET) == []
    job = RunStore.open(str(store)).attrs["job"]
    assert job["tracking"]["tracking_uri"] == redact(uri)
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("secrets")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # the run and its resumed child, logged without the password in the store
    for run in runs:
        assert run.info.status == "FINISHED"
        for value in (*run.data.params.values(), *run.data.tags.values()):
            assert SECRET not in value
    assert files_containing(server.root, SECRET) == []  # the server's database and artifacts


def test_every_command_the_readme_and_jobs_start_binds_to_loopback():
    """`mlflow ui`/`mlflow server` with --host 127.0.0.1, `ray start` with its dashboard on
    127.0.0.1; 0.0.0.0 appears only in the README's explicit opt-in sentence."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *ROOT.glob("jobs/*.py"),
                                        *ROOT.glob("configs/*.yaml"),
                                        ROOT / "distvi" / "cli.py"]}
    commands = 0
    for path, text in texts.items():
        for line in text.splitlines():
            if re.search(r"\bmlflow (ui|server)\b", line) and "--backend-store-uri" in line:
                commands += 1
                assert "--host 127.0.0.1" in line, f"{path.name}: {line}"
            if re.search(r"^\s*ray start\b", line):  # a command line, not prose
                commands += 1
                assert "--dashboard-host 127.0.0.1" in line, f"{path.name}: {line}"
            if "0.0.0.0" in line:
                assert "only on a trusted network" in line, f"{path.name}: {line}"
    assert commands >= 3


JOIN = """
import distvi as dv, numpy as np, pymc as pm
def model(data):
    with pm.Model() as m:
        mu = pm.Normal("mu", 0, 1)
        pm.Normal("y", mu, 1, observed=data["y"])
    return m
a = dv.fit(3, model=model, data={"y": np.ones(20)}, backend="ray", num_workers=1, progressbar=False)
print("joined", a.mean)
"""


def test_joining_a_token_protected_cluster_without_the_token_is_a_clear_error(tmp_path):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    home_a.mkdir()
    home_b.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    token = subprocess.run([ray_bin, "get-auth-token", "--generate"], env={**base, "HOME": str(home_a)},
                           capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    port = free_port()
    short_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths: <= 107 bytes
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={short_dir}"],
        env={**base, "HOME": str(home_a)}, stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 90)
        client = {**base, "HOME": str(home_b), "RAY_ADDRESS": f"127.0.0.1:{port}"}
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", JOIN], env=client, capture_output=True,
                             text=True, timeout=300)
        took = time.monotonic() - t0
        assert out.returncode != 0
        assert "requires an auth token and this process has none" in out.stderr, out.stderr[-2000:]
        assert "RAY_AUTH_MODE=token" in out.stderr
        print(f"refused after {took:.1f} s")
        # the advice in the message works
        ok = subprocess.run([sys.executable, "-c", JOIN], capture_output=True, text=True, timeout=300,
                            env={**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert ok.returncode == 0 and "joined" in ok.stdout, ok.stderr[-2000:]
        assert token not in ok.stdout + ok.stderr + out.stdout + out.stderr
    finally:
        stop_ray_head(head, short_dir)
        shutil.rmtree(short_dir, ignore_errors=True)


def test_the_token_file_distvi_writes_is_private(tmp_path, monkeypatch):
    from distvi.backends.ray_cluster import owner_only_token

    path = tmp_path / "dir" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    owner_only_token()
    assert not path.exists()  # auth off: no token
    monkeypatch.delenv("RAY_AUTH_MODE")
    owner_only_token()
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    owner_only_token()
    assert path.read_text() == token  # an existing token is kept ...
    path.chmod(0o644)
    owner_only_token()
    assert path.stat().st_mode & 0o777 == 0o600  # ... and narrowed to its owner
    target = tmp_path / "elsewhere"
    target.write_text("x")
    target.chmod(0o644)
    path.unlink()
    path.symlink_to(target)
    owner_only_token()
    assert target.stat().st_mode & 0o777 == 0o644  # a symlink is not followed


def test_an_address_where_nothing_answers_fails_at_once():
    from distvi.backends.ray_cluster import WorkerError, check_can_join

    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"no Ray cluster answers at 127.0.0.1:1 "):
        check_can_join("127.0.0.1:1")
    assert time.monotonic() - t0 < 10
