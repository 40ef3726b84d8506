"""A Student-t regression in a Zarr store on two Ray workers, fitted until converged from the
map start, against a Laplace approximation at the MAP computed here with numpy and scipy
alone."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest
from conftest import write_zarr
from scipy import optimize, stats

import distvi as dv

ROWS, K = 50_000, 4


def t_factory(d):
    with pm.Model() as m:
        b = pm.Normal("b", 0.0, 10.0, shape=K)
        sigma = pm.HalfNormal("sigma", 5.0)
        nu = pm.Gamma("nu", alpha=2.0, beta=0.1)
        pm.StudentT("y", nu=nu, mu=pm.math.dot(d["X"], b), sigma=sigma, observed=d["y"])
    return m


def student_t_data(rows: int = ROWS, seed: int = 5):
    rng = np.random.default_rng(seed)
    C = 0.7 ** np.abs(np.subtract.outer(np.arange(K), np.arange(K)))
    X = rng.multivariate_normal(np.zeros(K), C, size=rows)
    y = X @ np.array([1.0, -0.5, 0.25, 2.0]) + 1.5 * rng.standard_t(4.0, size=rows)
    return {"X": X, "y": y}


def neg_log_density(theta, X, y):
    """-log p in the unconstrained space (b, log sigma, log nu), Jacobians included."""
    b, log_s, log_nu = theta[:K], theta[K], theta[K + 1]
    s, nu = np.exp(log_s), np.exp(log_nu)
    lp = stats.t.logpdf(y, df=nu, loc=X @ b, scale=s).sum()
    lp += stats.norm.logpdf(b, 0.0, 10.0).sum()
    lp += stats.halfnorm.logpdf(s, scale=5.0) + log_s
    lp += stats.gamma.logpdf(nu, a=2.0, scale=10.0) + log_nu
    return -lp


def laplace(X, y):
    x0 = np.concatenate([np.linalg.lstsq(X, y, rcond=None)[0], [0.0, np.log(5.0)]])
    res = optimize.minimize(neg_log_density, x0, args=(X, y), method="BFGS",
                            options={"gtol": 1e-6})
    x, d = res.x, len(res.x)
    h = 1e-3 * np.sqrt(np.abs(np.diag(res.hess_inv)))
    H = np.empty((d, d))
    f = lambda t: neg_log_density(t, X, y)  # noqa: E731
    for i in range(d):
        for j in range(i, d):
            ei, ej = np.eye(d)[i] * h[i], np.eye(d)[j] * h[j]
            H[i, j] = H[j, i] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej)
                                 + f(x - ei - ej)) / (4 * h[i] * h[j])
    return x, np.linalg.inv(H)


@pytest.mark.usefixtures("ray_cluster")
def test_student_t_on_two_ray_workers_matches_the_laplace_approximation(tmp_path):
    data = student_t_data()
    mode, cov = laplace(data["X"], data["y"])
    sd = np.sqrt(np.diag(cov))
    source = dv.data.ZarrSource(write_zarr(tmp_path / "t.zarr", data, chunk_rows=5_000))
    with dv.FullRankADVI(model=t_factory, data=source, num_workers=2, backend="ray",
                         random_seed=2) as inf:
        approx = inf.fit(None, progressbar=False)
    names = approx.param_names_flat()
    assert names == ["b"] * K + ["sigma", "nu"]  # unconstrained: log sigma, log nu
    assert inf.start_report.method == "map"
    assert inf.converged, inf.convergence
    np.testing.assert_allclose(np.asarray(approx.std), sd, rtol=0.10)
    assert np.max(np.abs(np.asarray(approx.mean) - mode) / sd) < 0.3
