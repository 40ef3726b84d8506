"""Shared fixtures: small real models with closed-form posteriors."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest


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
