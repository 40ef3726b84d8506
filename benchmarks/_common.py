"""What the benchmark scripts share: the core ADVI job (its data and model factory), a logistic
factory sized by its data, timing ``refine(n)``, medians and formatting, the environment
record, writing a result JSON, and a throwaway local Ray instance.

The scripts import from here and never from one another, so that running or changing one
benchmark does not pull in another's module-level setup or constants.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# the core job (bench_advi measures it, bench_recording records it): logistic regression,
# D features, no intercept, mean-field ADVI, adam(LEARNING_RATE), random_seed=FIT_SEED
D = 20
DATA_SEED = 20240601
FIT_SEED = 1
LEARNING_RATE = 0.01


# ---------------------------------------------------------------------------- data & models
def make_data(rows: int, d: int = D, seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X ~ N(0, 1) (rows x d, float64), w ~ N(0, 0.5), no intercept, y ~ Bernoulli(sigmoid(X w))."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, size=(rows, d))
    w_true = rng.normal(0.0, 0.5, size=d)
    p = 1.0 / (1.0 + np.exp(-(X @ w_true)))
    y = rng.binomial(1, p).astype(np.int64)
    return X, y, w_true


def distvi_factory(data):
    """The core job's model for distvi (``D`` coefficients, the observed named ``obs``)."""
    import pymc as pm

    with pm.Model() as model:
        w = pm.Normal("w", 0.0, 1.0, shape=D)
        pm.Bernoulli("obs", logit_p=data["X"] @ w, observed=data["y"])
    return model


def logistic_factory(data):
    """Logistic regression without intercept, as many coefficients as ``data["X"]`` has columns."""
    import pymc as pm

    d = data["X"].type.shape[1]
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=d)
        pm.Bernoulli("y", logit_p=data["X"] @ w, observed=data["y"])
    return m


# ---------------------------------------------------------------------------- timing & summaries
def refine_seconds(inference, n: int) -> float:
    """Wall time of ``inference.refine(n)``: the iterations alone, once a warm-up fit has
    compiled the step (PyMC's and distvi's ``refine`` both reuse it and the optimizer state)."""
    t0 = time.perf_counter()
    inference.refine(n, progressbar=False)
    return time.perf_counter() - t0


def median(values: list[float | None]) -> float | None:
    """The median of the values that exist (a failed run leaves a None), None if there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def quiet_logs(*others: str) -> None:
    """PyMC's (and ``others``') INFO lines off, so the output is the report. Importing pymc
    sets its logger to INFO, so it is imported first; import the ``others`` before calling."""
    import logging

    import pymc  # noqa: F401

    for name in ("pymc", *others):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------- the record
def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def environment() -> dict[str, Any]:
    """Date, machine, load and the versions and BLAS the figures depend on."""
    import numpy
    import pymc
    import pytensor

    try:
        import distvi
        distvi_version = getattr(distvi, "__version__", "?")
    except Exception as exc:  # reported, not fatal: the PyMC side can still run
        distvi_version = f"import failed: {exc!r}"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": now_utc(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "pymc": pymc.__version__,
        "pytensor": pytensor.__version__,
        "numpy": numpy.__version__,
        "distvi": distvi_version,
        "pytensor_blas_ldflags": pytensor.config.blas__ldflags,
        "distvi_blas": _distvi_blas(),
        "distvi_block_form": _block_form(),
        "jax": _version_of("jax"),
        "pytensor_mode": str(pytensor.config.mode),
        "threads_env": {k: os.environ.get(k) for k in
                        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def _block_form() -> str:
    """The compiled form of distvi's fused blocks here (DISTVI_BLOCK_FORM, default auto)."""
    try:
        from distvi.driver.fused import block_form
        return block_form()
    except Exception as exc:  # reported, not fatal
        return f"unknown ({exc!r})"


def _version_of(name: str) -> str | None:
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", "?")


def _distvi_blas() -> str:
    """What distvi links its own compiled functions against (pymc.fit links nothing)."""
    try:
        from distvi._compile import blas_flags
    except Exception as exc:  # reported, not fatal
        return f"unknown ({exc!r})"
    flags = blas_flags()
    return next((f for f in flags.split() if f.startswith("-l")), "none") if flags else "none"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A benchmark's JSON, written whole or not at all (numpy scalars as Python numbers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))
                   + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


# ---------------------------------------------------------------------------- Ray
def local_ray_without_auth() -> None:
    """A throwaway local instance on loopback needs no token; a setting the caller made wins."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_local_ray():
    """``ray.init`` on the benchmark machine's two cores, quietly; returns the ``ray`` module."""
    local_ray_without_auth()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray
