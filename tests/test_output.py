"""What ``make run`` prints: the user's run and nothing of the machinery's. One subprocess runs
the Makefile's job (``jobs/quickstart.py`` with ``configs/quickstart.yaml``, Ray as
configured) on a slice, with its store and MLflow database in a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a Ray C++ log line at warning level or above, with or without an actor's "(name pid=..)" prefix:
# "[2026-12-03 10:00:00,123 W 4242 4242] core_worker.cc:..."
RAY_NATIVE = re.compile(r"^\s*(\([^)]*\)\s*)?\[\d{4}-\d\d-\d\d [\d:,.]+ [WEF] \d+ \d+\]")
# a Python log record at warning level or above from a Ray module ("... WARNING compiled_dag_node.py:..")
RAY_PYTHON = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b.*\b[\w/]*\.py:\d+")
RAY_NAMES = re.compile(r"compiled_dag_node\.py|core_worker\.cc|constructor arguments in the object store")
PYTHON_WARNING = re.compile(r"\b\w*Warning: ")
MLFLOW_SETUP = re.compile(r"INFO mlflow\.store\.db\.utils")  # a new SQLite file's tables
BLAS = re.compile(r"WARNING.*pytensor.*BLAS|BLAS.*WARNING", re.I)


def unwanted(output: str) -> list[str]:
    """The lines of ``output`` that are about the machinery rather than the user's run: Ray's
    warnings and errors, Python warnings, MLflow's database set-up, and pytensor's BLAS
    warning past its first."""
    out, blas = [], 0
    for line in output.splitlines():
        if BLAS.search(line):
            blas += 1
            if blas > 1:
                out.append(line)
        elif RAY_NATIVE.search(line) or RAY_PYTHON.search(line) or RAY_NAMES.search(line) \
                or PYTHON_WARNING.search(line) or MLFLOW_SETUP.search(line):
            out.append(line)
    return out


def test_the_line_filter_tells_machinery_from_the_run():
    assert unwanted("\n".join([
        "[2026-12-03 10:00:00,123 W 4242 4243] core_worker.cc:512: constructor arguments in the object store",
        "(ShardWorker pid=77) [2026-12-03 10:00:01,002 E 77 90] raylet_client.cc:60: gone",
        "2026-12-03 10:00:02,000\tWARNING compiled_dag_node.py:2170: teardown took long",
        "/x/y.py:3: UserWarning: something",
        "2026/12/03 05:42:52 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "WARNING (pytensor.tensor.blas): Using NumPy C-API based implementation for BLAS functions.",
        "fitted jobs.quickstart:model (outcome morekids, 4,000 rows, 2 shards on ray) with advi: 200 steps",
        "WARNING (pytensor.tensor.blas): Using NumPy C-API based implementation for BLAS functions.",
        "step 200/200 (100%)  loss=3244.03  55.2 it/s  ETA 0 s",
    ])) == [
        "[2026-12-03 10:00:00,123 W 4242 4243] core_worker.cc:512: constructor arguments in the object store",
        "(ShardWorker pid=77) [2026-12-03 10:00:01,002 E 77 90] raylet_client.cc:60: gone",
        "2026-12-03 10:00:02,000\tWARNING compiled_dag_node.py:2170: teardown took long",
        "/x/y.py:3: UserWarning: something",
        "2026/12/03 05:42:52 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        "WARNING (pytensor.tensor.blas): Using NumPy C-API based implementation for BLAS functions.",
    ]


@pytest.mark.needs_quiet_ray
def test_make_run_prints_the_run_and_no_warnings_of_the_machinery(tmp_path):
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "$(PY) jobs/quickstart.py\n" in make  # what `make run` runs; its default config:
    assert '"configs/quickstart.yaml"' in (ROOT / "jobs" / "quickstart.py").read_text(encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, str(ROOT / "jobs" / "quickstart.py"),
           "--config", str(ROOT / "configs" / "quickstart.yaml"), "--set", "n=200",
           "--set", "data.options={rows: 4000}", "--set", f"store={tmp_path / 'q.zarr'}",
           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"^fitted jobs\.quickstart:model \(outcome morekids, 4,000 rows, 2 shards on "
                     r"ray\) with advi: 200 steps in \d+\.\d s$", proc.stdout, re.M), proc.stdout[-4000:]
    lines = unwanted(proc.stdout)
    assert not lines, "\n".join(lines)
