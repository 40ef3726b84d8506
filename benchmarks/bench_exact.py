"""Benchmark: time to an exact posterior, distvi against ``pymc.fit``.

Bayesian linear regression with known noise, so the posterior is Gaussian and known in closed
form: rows x_i ~ N(0, S) with S_jk = 0.9^|j-k| (correlated columns), y = X w + e,
e ~ N(0, 1); prior w ~ N(0, 10^2 I). Full-rank ADVI can represent this posterior exactly.

Both tools fit full-rank ADVI on the full data (no minibatch; the gradient noise is the Monte
Carlo draw alone) with the same schedule: ``adam`` with a learning rate that decays
geometrically from ``--lr0`` to ``--lr1`` over ``--steps`` steps (PyMC: a shared learning rate
set by a callback before each step; distvi: its ``GeometricDecay``). Every ``--every`` steps a
callback compares the fitted mean and covariance with the closed form, and the fit stops the
first time **every** posterior sd is within 2 % and every mean within 0.2 sd. The figure is
the wall time from the start of the ``fit`` call (model building and compilation included) to
that check; the checks cost the same in both tools (a compiled function of the parameters in
PyMC, the approximation's arrays in distvi). Repeats are interleaved, medians reported.

Usage
-----
    .venv/bin/python benchmarks/bench_exact.py            # full run
    .venv/bin/python benchmarks/bench_exact.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, median, quiet_logs, write_result  # noqa: E402

ROWS, D, NOISE, PRIOR_SD = 20_000, 6, 1.0, 10.0
DATA_SEED = 7
SD_TOL, MEAN_TOL = 0.02, 0.2
DEFAULT_OUT = RESULTS / "exact.json"


def make_data(rows: int = ROWS, d: int = D, seed: int = DATA_SEED):
    rng = np.random.default_rng(seed)
    cov = 0.9 ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    X = rng.multivariate_normal(np.zeros(d), cov, size=rows)
    w = rng.normal(0.0, 1.0, size=d)
    y = X @ w + rng.normal(0.0, NOISE, size=rows)
    return X, y


def exact_posterior(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    precision = X.T @ X / NOISE**2 + np.eye(X.shape[1]) / PRIOR_SD**2
    cov = np.linalg.inv(precision)
    return cov @ (X.T @ y) / NOISE**2, cov


class Criterion:
    """Called every ``every`` steps with the fitted mean and covariance; records when the
    fit first meets the tolerance and stops it."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray, every: int) -> None:
        self.mean, self.sd, self.every = mean, np.sqrt(np.diag(cov)), every
        self.t0 = time.perf_counter()
        self.hit: dict[str, Any] | None = None
        self.last: dict[str, float] = {}

    def check(self, mean: np.ndarray, cov: np.ndarray, step: int) -> None:
        sd_err = float(np.max(np.abs(np.sqrt(np.diag(cov)) / self.sd - 1.0)))
        mean_err = float(np.max(np.abs(mean - self.mean) / self.sd))
        self.last = {"step": step, "sd_rel_err": sd_err, "mean_err_sd": mean_err}
        if sd_err <= SD_TOL and mean_err <= MEAN_TOL:
            self.hit = {"seconds": time.perf_counter() - self.t0, **self.last}
            raise StopIteration


def schedule(lr0: float, lr1: float, steps: int):
    return lambda t: lr0 * (lr1 / lr0) ** min(t / steps, 1.0)


def run_pymc(X, y, mean, cov, args) -> dict[str, Any]:
    import pymc as pm
    import pytensor

    crit = Criterion(mean, cov, args.every)
    lr_of = schedule(args.lr0, args.lr1, args.steps)
    lr = pytensor.shared(np.float64(lr_of(0)), name="lr")
    with pm.Model():
        w = pm.Normal("w", 0.0, PRIOR_SD, shape=X.shape[1])
        pm.Normal("y", X @ w, NOISE, observed=y)
        inference = pm.FullRankADVI(random_seed=args.seed)
        moments = pytensor.function([], [inference.approx.mean, inference.approx.cov])

        def callback(approx, losses, i):
            lr.set_value(np.float64(lr_of(i)))  # PyMC counts i from 0; the next step's rate
            if i % args.every == 0:
                m, c = moments()
                crit.check(m, c, i)

        inference.fit(args.max_steps, obj_optimizer=pm.adam(learning_rate=lr),
                      obj_n_mc=args.n_mc, callbacks=[callback], progressbar=False)
    return {"hit": crit.hit, "last": crit.last, "total_s": time.perf_counter() - crit.t0}


def run_distvi(X, y, mean, cov, args) -> dict[str, Any]:
    import pymc as pm

    import distvi as dv
    from distvi.optimizers import GeometricDecay

    def model(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, PRIOR_SD, shape=D)
            pm.Normal("y", data["X"] @ w, NOISE, observed=data["y"])
        return m

    crit = Criterion(mean, cov, args.every)

    def callback(approx, losses, i):
        if i % args.every == 0:
            crit.check(approx.mean, approx.cov, i)

    callback.call_every = args.every  # it acts at multiples of every: fused blocks end there

    dv.fit(args.max_steps, method="fullrank_advi", model=model, data={"X": X, "y": y},
           random_seed=args.seed, progressbar=False, callbacks=[callback], obj_n_mc=args.n_mc,
           obj_optimizer=dv.adam(learning_rate=GeometricDecay(args.lr0, args.lr1, 0, args.steps)))
    return {"hit": crit.hit, "last": crit.last, "total_s": time.perf_counter() - crit.t0}


def run(args) -> dict[str, Any]:
    quiet_logs()
    X, y = make_data(args.rows)
    mean, cov = exact_posterior(X, y)
    runs: dict[str, list] = {"pymc": [], "distvi": []}
    for r in range(args.repeats):
        for name, fn in (("pymc", run_pymc), ("distvi", run_distvi)):
            res = fn(X, y, mean, cov, args)
            runs[name].append(res)
            hit = res["hit"]
            print(f"# repeat {r + 1}/{args.repeats} {name:6s}: "
                  + (f"exact after {hit['step']} steps, {hit['seconds']:.2f} s "
                     f"({1e6 * hit['seconds'] / max(hit['step'], 1):.0f} us/step)" if hit else
                     f"not within tolerance after {args.max_steps} steps ({res['last']})"), flush=True)
    summary = {}
    for name, rs in runs.items():
        secs = [r["hit"]["seconds"] if r["hit"] else None for r in rs]
        steps = [r["hit"]["step"] if r["hit"] else None for r in rs]
        summary[name] = {"seconds_median": median(secs), "steps_median": median(steps),
                         "reached": sum(s is not None for s in secs), "runs": len(rs)}
    p, d = summary["pymc"]["seconds_median"], summary["distvi"]["seconds_median"]
    return {"benchmark": "time_to_exact_posterior",
            "config": {k: getattr(args, k) for k in ("rows", "steps", "max_steps", "lr0", "lr1",
                                                      "every", "n_mc", "repeats", "seed")}
            | {"d": D, "noise": NOISE, "prior_sd": PRIOR_SD, "sd_tol": SD_TOL, "mean_tol": MEAN_TOL},
            "summary": summary, "runs": runs,
            "ratio_distvi_over_pymc_time": (d / p) if p and d else None}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--steps", type=int, default=20_000, help="decay length of the schedule")
    ap.add_argument("--max-steps", dest="max_steps", type=int, default=40_000)
    ap.add_argument("--lr0", type=float, default=0.05)
    ap.add_argument("--lr1", type=float, default=0.0005)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--n-mc", dest="n_mc", type=int, default=10, help="draws per step (obj_n_mc)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.repeats = 1
    result = run(args)
    s = result["summary"]
    print(f"\ntime to exact posterior: pymc {s['pymc']['seconds_median']} s "
          f"({s['pymc']['steps_median']} steps), distvi {s['distvi']['seconds_median']} s "
          f"({s['distvi']['steps_median']} steps); distvi/pymc {result['ratio_distvi_over_pymc_time']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
