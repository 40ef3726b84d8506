"""Model factories that ``dv.resume(store)`` can import by ``module:qualname`` (this module is
importable as ``resumable_models`` wherever ``tests/`` is on the path, as under pytest)."""

from __future__ import annotations

import numpy as np
import pymc as pm


def linreg(data):
    """A linear regression on ``X`` (rows x 3) and ``y``."""
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
    return m


def linreg_data(n_rows: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, 3))
    return {"X": X, "y": X @ np.array([1.0, -0.5, 0.25]) + rng.normal(size=n_rows)}
