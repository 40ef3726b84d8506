"""Benchmark: fits run until converged (``fit(None)``), against hand-annealed schedules and
against an independent Laplace approximation.

Two cases, one table, one run (ratios of medians taken within the run):

1. **Conjugate regression** (``bench_exact``'s data: 20,000 rows, 6 columns correlated
   0.9^|i-j|, known noise, prior w ~ N(0, 10^2 I); the posterior is Gaussian, known in closed
   form). Full-rank ADVI on the full data, three tools, repeats interleaved:

   - distvi ``FullRankADVI(model=..., data=..., random_seed=s).fit(None)``, defaults only
     (a Pathfinder start from L-BFGS, then phases at halving rates until two successive
     phases' averages agree);
   - ``pymc.fit`` (``pm.FullRankADVI``) with a hand-annealed schedule: 3 x 10,000 steps of
     adam at 0.005 / 0.001 / 0.0002 (a shared learning rate set by a callback, as in
     ``bench_exact``), ``obj_n_mc=4``;
   - NumPyro SVI, ``AutoMultivariateNormal``, ``Trace_ELBO(num_particles=4)``, adam with the
     same piecewise-constant schedule, when numpyro and jax are installed (skipped if not).

   For each: wall time from before the model is built to the fitted moments (compilation
   included), gradient evaluations (distvi: ``inference.gradient_evaluations``; the others:
   steps x 4 particles), and the error against the closed form (largest relative sd error,
   largest |mean error| / sd). Target (issue 17): distvi's wall time <= 1/5 of pm.fit's.

2. **Student-t regression** on ``--rows`` rows (default 1,000,000) in a Zarr store on local
   disk (``--workdir``, written once): intercept, 6 predictors correlated 0.7^|i-j|, y =
   alpha + X beta + sigma * t_nu with nu = 4; priors alpha, beta ~ N(0, 10), sigma ~
   HalfNormal(5), nu ~ Gamma(2, 0.1). distvi ``FullRankADVI`` with ``fit(None)`` on two Ray
   workers, each reading its half of the store, ``--batch`` rows per shard per step. The
   reference is a Laplace approximation computed without distvi or PyMC: the log density in
   PyMC's unconstrained parametrisation (log sigma, log nu, with their log-Jacobians) and its
   analytic gradient in numpy, the MAP by ``scipy.optimize.minimize`` (polished by Newton
   steps), the Hessian by central differences of the gradient, covariance = its inverse. The
   numpy density is checked against PyMC's own ``logp`` (and the gradient against finite
   differences) on the first rows before it is used. Target: every sd within 10 % of
   Laplace's.

Usage
-----
    .venv/bin/python benchmarks/bench_converge.py            # full run
    .venv/bin/python benchmarks/bench_converge.py --quick    # smoke run (100k rows, 1 repeat)
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, fmt, median, quiet_logs, start_local_ray, write_result  # noqa: E402
from bench_exact import NOISE, PRIOR_SD, make_data, exact_posterior  # noqa: E402

DEFAULT_OUT = RESULTS / "converge.json"
SCHEDULE = (0.005, 0.001, 0.0002)   # the hand-annealed adam rates, one per phase
N_MC = 4                            # particles per step for pm.fit and NumPyro
SD_TARGET = 0.10                    # Student-t: sds within 10 % of Laplace's
SPEED_TARGET = 5.0                  # conjugate: pm.fit wall / distvi wall >= 5

# the Student-t case
ST_D, ST_NU, ST_SIGMA, ST_ALPHA, ST_CORR = 6, 4.0, 1.5, 1.0, 0.7
ST_SEED, ST_CHUNK = 20261127, 50_000
PRIOR_COEF_SD, PRIOR_SIGMA_SD, PRIOR_NU_A, PRIOR_NU_B = 10.0, 5.0, 2.0, 0.1
ST_FORMAT = 1  # bump when the generator changes what it writes


def accuracy(mean, cov, ref_mean, ref_cov) -> dict[str, float]:
    sd, ref_sd = np.sqrt(np.diag(cov)), np.sqrt(np.diag(ref_cov))
    return {"max_sd_rel_err": float(np.max(np.abs(sd / ref_sd - 1.0))),
            "max_mean_err_sd": float(np.max(np.abs(np.asarray(mean) - ref_mean) / ref_sd)),
            "sd_ratio": (sd / ref_sd).tolist(), "mean_err_sd": ((np.asarray(mean) - ref_mean) / ref_sd).tolist()}


# ============================================================================ 1. conjugate
def conj_distvi(X, y, seed: int, args) -> dict[str, Any]:
    import pymc as pm

    import distvi as dv

    d = X.shape[1]

    def model(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, PRIOR_SD, shape=d)
            pm.Normal("y", data["X"] @ w, NOISE, observed=data["y"])
        return m

    t0 = time.perf_counter()
    inf = dv.FullRankADVI(model=model, data={"X": X, "y": y}, random_seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        approx = inf.fit(None, progressbar=False)
    mean, cov = np.array(approx.mean), np.array(approx.cov)
    wall = time.perf_counter() - t0
    inf.close()
    conv, start = inf.convergence, inf.start_report
    return {"wall_s": wall, "gradient_evaluations": int(inf.gradient_evaluations),
            "steps": int(inf.state.step), "converged": bool(inf.converged), "reason": conv.reason,
            "phases": len(conv.phases), "start_report": start.as_dict() if start else None,
            "convergence": conv.as_dict(), "mean": mean, "cov": cov,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


def conj_pymc(X, y, seed: int, args) -> dict[str, Any]:
    import pymc as pm
    import pytensor

    steps = args.phase_steps
    rate = lambda t: SCHEDULE[min(t // steps, len(SCHEDULE) - 1)]  # noqa: E731  t counts from 0
    t0 = time.perf_counter()
    lr = pytensor.shared(np.float64(rate(0)), name="lr")
    with pm.Model():
        w = pm.Normal("w", 0.0, PRIOR_SD, shape=X.shape[1])
        pm.Normal("y", X @ w, NOISE, observed=y)
        inference = pm.FullRankADVI(random_seed=seed)

        def callback(approx, losses, i):
            lr.set_value(np.float64(rate(i + 1)))  # PyMC counts i from 0: the next step's rate

        inference.fit(len(SCHEDULE) * steps, obj_optimizer=pm.adam(learning_rate=lr),
                      obj_n_mc=N_MC, callbacks=[callback], progressbar=False)
        mean = inference.approx.mean.eval()
        cov = inference.approx.cov.eval()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "gradient_evaluations": len(SCHEDULE) * steps * N_MC,
            "steps": len(SCHEDULE) * steps, "mean": mean, "cov": cov}


def numpyro_available() -> str | None:
    """None when numpyro and jax import, else why not."""
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc})"
    return None


def conj_numpyro(X, y, seed: int, args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal

    jax.config.update("jax_enable_x64", True)
    steps = args.phase_steps
    t0 = time.perf_counter()
    Xj, yj = jnp.asarray(X), jnp.asarray(y)

    def model(Xd, yd):
        w = numpyro.sample("w", ndist.Normal(0.0, PRIOR_SD).expand([Xd.shape[1]]).to_event(1))
        numpyro.sample("y", ndist.Normal(Xd @ w, NOISE).to_event(1), obs=yd)

    def step_size(i):  # piecewise constant: 0.005 / 0.001 / 0.0002 over 3 x steps
        return jnp.where(i < steps, SCHEDULE[0], jnp.where(i < 2 * steps, SCHEDULE[1], SCHEDULE[2]))

    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(step_size), Trace_ELBO(num_particles=N_MC))
    res = svi.run(jax.random.PRNGKey(seed), len(SCHEDULE) * steps, Xj, yj, progress_bar=False)
    post = guide.get_posterior(res.params)  # w is unconstrained: the guide's Gaussian is q(w)
    mean, cov = np.asarray(post.mean), np.asarray(post.covariance_matrix)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "gradient_evaluations": len(SCHEDULE) * steps * N_MC,
            "steps": len(SCHEDULE) * steps, "mean": mean, "cov": cov,
            "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__}}


def conjugate(args) -> dict[str, Any]:
    X, y = make_data()
    ref_mean, ref_cov = exact_posterior(X, y)
    tools = {"distvi": conj_distvi, "pymc": conj_pymc}
    skipped = numpyro_available() if not args.no_numpyro else "skipped (--no-numpyro)"
    if skipped is None:
        tools["numpyro"] = conj_numpyro
    else:
        print(f"# NumPyro row skipped: numpyro/jax {skipped}", flush=True)
    runs: dict[str, list] = {k: [] for k in tools}
    for r in range(args.repeats):
        seed = args.seed + r
        for name, fn in tools.items():
            try:
                res = fn(X, y, seed, args)
            except Exception:
                print(f"# conjugate {name} FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                runs[name].append({"failed": traceback.format_exc(limit=3)})
                continue
            res["accuracy"] = accuracy(res.pop("mean"), res.pop("cov"), ref_mean, ref_cov)
            runs[name].append(res)
            a = res["accuracy"]
            extra = (f", {res['reason']} after {res['steps']} steps in {res['phases']} phases"
                     if name == "distvi" else "")
            print(f"# conjugate repeat {r + 1}/{args.repeats} {name:7s}: {res['wall_s']:.2f} s, "
                  f"{res['gradient_evaluations']:,} gradient evaluations{extra}; sd err "
                  f"{100 * a['max_sd_rel_err']:.2f} %, mean err {a['max_mean_err_sd']:.3f} sd", flush=True)
    summary = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "failed" not in r]
        summary[name] = {"wall_s_median": median([r["wall_s"] for r in ok]),
                         "gradient_evaluations_median": median([r["gradient_evaluations"] for r in ok]),
                         "max_sd_rel_err_median": median([r["accuracy"]["max_sd_rel_err"] for r in ok]),
                         "max_mean_err_sd_median": median([r["accuracy"]["max_mean_err_sd"] for r in ok]),
                         "max_sd_rel_err_worst": max((r["accuracy"]["max_sd_rel_err"] for r in ok), default=None),
                         "max_mean_err_sd_worst": max((r["accuracy"]["max_mean_err_sd"] for r in ok), default=None),
                         "runs": len(rs), "ok": len(ok)}
    if "distvi" in summary:
        summary["distvi"]["converged"] = sum(bool(r.get("converged")) for r in runs["distvi"])
    d = summary["distvi"]["wall_s_median"]
    ratios = {f"{k}_over_distvi_wall": (summary[k]["wall_s_median"] / d if d and summary[k]["wall_s_median"] else None)
              for k in summary if k != "distvi"}
    r = ratios.get("pymc_over_distvi_wall")
    return {"config": {"rows": X.shape[0], "d": X.shape[1], "noise": NOISE, "prior_sd": PRIOR_SD,
                       "schedule": SCHEDULE, "phase_steps": args.phase_steps, "n_mc": N_MC,
                       "repeats": args.repeats, "seeds": [args.seed + i for i in range(args.repeats)]},
            "numpyro": skipped or "ran", "summary": summary, "ratios": ratios,
            "target": f"distvi wall <= 1/{SPEED_TARGET:g} of pm.fit's",
            "target_met": r is not None and r >= SPEED_TARGET, "runs": runs}


# ============================================================================ 2. Student-t
def st_truth(d: int = ST_D) -> np.ndarray:
    return np.random.default_rng(ST_SEED).normal(0.0, 1.0, size=d)


def write_student_zarr(path: Path, rows: int, d: int = ST_D) -> str:
    """The Student-t rows as a Zarr group (``X`` rows x d, ``y``), chunk by chunk, each chunk
    from its own seeded stream; an existing complete group of the same settings is reused."""
    import zarr

    want = {"rows": rows, "d": d, "seed": ST_SEED, "chunk": ST_CHUNK, "format": ST_FORMAT}
    if (path / "zarr.json").exists():
        g = zarr.open_group(str(path), mode="r")
        if {k: g.attrs.get(k) for k in want} == want and g.attrs.get("complete"):
            return str(path)
    g = zarr.open_group(str(path), mode="w")
    Xa = g.create_array("X", shape=(rows, d), chunks=(ST_CHUNK, d), dtype="float64")
    ya = g.create_array("y", shape=(rows,), chunks=(ST_CHUNK,), dtype="float64")
    chol = np.linalg.cholesky(ST_CORR ** np.abs(np.subtract.outer(np.arange(d), np.arange(d))))
    beta = st_truth(d)
    for i, start in enumerate(range(0, rows, ST_CHUNK)):
        stop = min(start + ST_CHUNK, rows)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(ST_SEED, spawn_key=(i,))))
        X = rng.normal(size=(stop - start, d)) @ chol.T
        Xa[start:stop] = X
        ya[start:stop] = ST_ALPHA + X @ beta + ST_SIGMA * rng.standard_t(ST_NU, size=stop - start)
    g.attrs.update({**want, "complete": True})
    return str(path)


def student_factory(data):
    """The Student-t regression for distvi (and, on numpy arrays, for the PyMC check)."""
    import pymc as pm

    d = data["X"].type.shape[1] if hasattr(data["X"], "type") else data["X"].shape[1]
    with pm.Model() as m:
        alpha = pm.Normal("alpha", 0.0, PRIOR_COEF_SD)
        beta = pm.Normal("beta", 0.0, PRIOR_COEF_SD, shape=d)
        sigma = pm.HalfNormal("sigma", PRIOR_SIGMA_SD)
        nu = pm.Gamma("nu", alpha=PRIOR_NU_A, beta=PRIOR_NU_B)
        pm.StudentT("y", nu=nu, mu=alpha + data["X"] @ beta, sigma=sigma, observed=data["y"])
    return m


class StudentDensity:
    """log p and its gradient in PyMC's unconstrained space, theta = (alpha, beta_1..d,
    log sigma, log nu), log-Jacobians of the two log transforms included; numpy/scipy only."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y, self.n, self.d = X, y, X.shape[0], X.shape[1]
        self.evaluations = 0

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        from scipy.special import digamma, gammaln

        self.evaluations += 1
        d = self.d
        alpha, beta, u, w = theta[0], theta[1:1 + d], theta[1 + d], theta[2 + d]
        sigma, nu = np.exp(u), np.exp(w)
        r = self.y - alpha - self.X @ beta
        r2 = r * r
        q = nu * sigma**2 + r2
        l1p = np.log1p(r2 / (nu * sigma**2))
        n = self.n
        ll = n * (gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * np.log(nu * np.pi) - u) \
            - 0.5 * (nu + 1) * l1p.sum()
        dmu = (nu + 1) * r / q
        g = np.empty_like(theta)
        g[0] = dmu.sum()
        g[1:1 + d] = self.X.T @ dmu
        g[1 + d] = -n + (nu + 1) * (r2 / q).sum()
        dnu = n * (0.5 * digamma((nu + 1) / 2) - 0.5 * digamma(nu / 2) - 0.5 / nu) \
            - 0.5 * l1p.sum() + 0.5 * (nu + 1) / nu * (r2 / q).sum()
        g[2 + d] = nu * dnu
        # priors: Normal(0, s) on alpha and beta; HalfNormal(s) on sigma; Gamma(a, b) on nu;
        # each log-transformed one gets its log-Jacobian (+u, +w)
        s, sh, a, b = PRIOR_COEF_SD, PRIOR_SIGMA_SD, PRIOR_NU_A, PRIOR_NU_B
        coef = theta[:1 + d]
        lp = -0.5 * np.sum(coef**2) / s**2 - (1 + d) * (np.log(s) + 0.5 * np.log(2 * np.pi))
        lp += np.log(2.0) - 0.5 * np.log(2 * np.pi * sh**2) - sigma**2 / (2 * sh**2) + u
        lp += a * np.log(b) - gammaln(a) + (a - 1) * w - b * nu + w
        g[:1 + d] -= coef / s**2
        g[1 + d] += -sigma**2 / sh**2 + 1.0
        g[2 + d] += (a - 1) - b * nu + 1.0
        return float(ll + lp), g

    def hessian(self, theta: np.ndarray) -> np.ndarray:
        """Central differences of the analytic gradient, symmetrised."""
        k = theta.size
        H = np.empty((k, k))
        for j in range(k):
            h = 1e-5 * max(1.0, abs(theta[j]))
            e = np.zeros(k)
            e[j] = h
            H[:, j] = (self(theta + e)[1] - self(theta - e)[1]) / (2 * h)
        return 0.5 * (H + H.T)


def check_density(X: np.ndarray, y: np.ndarray, rows: int = 2000) -> dict[str, float]:
    """The numpy density against PyMC's on the first rows (same parametrisation, same
    constants) at a few points, and its gradient against finite differences."""
    X, y = X[:rows], y[:rows]
    dens = StudentDensity(X, y)
    model = student_factory({"X": X, "y": y})
    names = [v.name for v in model.value_vars]
    assert names == ["alpha", "beta", "sigma_log__", "nu_log__"], names
    logp = model.compile_logp()
    rng = np.random.default_rng(0)
    worst_logp, worst_grad = 0.0, 0.0
    for _ in range(3):
        theta = np.concatenate([[rng.normal()], rng.normal(size=X.shape[1]), [rng.normal(0.3, 0.3)],
                                [np.log(rng.uniform(2, 20))]])
        d = X.shape[1]
        point = {"alpha": theta[0], "beta": theta[1:1 + d], "sigma_log__": theta[1 + d], "nu_log__": theta[2 + d]}
        ref = float(logp(point))
        f, g = dens(theta)
        worst_logp = max(worst_logp, abs(f - ref) / max(1.0, abs(ref)))
        for j in range(theta.size):
            e = np.zeros(theta.size)
            e[j] = 1e-6
            fd = (dens(theta + e)[0] - dens(theta - e)[0]) / 2e-6
            worst_grad = max(worst_grad, abs(fd - g[j]) / max(1.0, abs(g[j])))
    if worst_logp > 1e-9 or worst_grad > 1e-5:
        raise AssertionError(f"the numpy Student-t density disagrees with PyMC's: logp rel err "
                             f"{worst_logp:.2e}, gradient rel err {worst_grad:.2e}")
    return {"logp_rel_err": worst_logp, "grad_rel_err": worst_grad, "rows": rows}


def laplace(path: str) -> dict[str, Any]:
    """MAP (scipy L-BFGS-B from least squares, then Newton steps on the finite-difference
    Hessian) and covariance = inverse Hessian of -log p, over all the rows."""
    import zarr
    from scipy.optimize import minimize

    t0 = time.perf_counter()
    g = zarr.open_group(path, mode="r")
    X, y = np.asarray(g["X"][:]), np.asarray(g["y"][:])
    check = check_density(X, y)
    dens = StudentDensity(X, y)
    A = np.column_stack([np.ones(len(y)), X])
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    mad = np.median(np.abs(y - A @ coef)) / 0.6745
    x0 = np.concatenate([coef, [np.log(mad)], [np.log(10.0)]])
    res = minimize(lambda t: tuple(-v for v in dens(t)), x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-9})
    x = res.x
    for _ in range(3):  # Newton polish: L-BFGS stops on a relative criterion
        H = -dens.hessian(x)
        x = x + np.linalg.solve(H, dens(x)[1])
    H = -dens.hessian(x)
    cov = np.linalg.inv(H)
    return {"map": x, "cov": cov, "sd": np.sqrt(np.diag(cov)), "grad_norm_at_map": float(np.linalg.norm(dens(x)[1])),
            "min_hessian_eig": float(np.linalg.eigvalsh(H).min()), "lbfgs": str(res.message),
            "evaluations": dens.evaluations, "seconds": time.perf_counter() - t0, "density_check": check}


def st_distvi(path: str, seed: int, args) -> dict[str, Any]:
    import distvi as dv

    t0 = time.perf_counter()
    inf = dv.FullRankADVI(model=student_factory, data=dv.data.ZarrSource(path), batch_size=args.batch,
                          num_workers=2, backend="ray", random_seed=seed, backend_options={"num_cpus": 1})
    built = time.perf_counter() - t0
    first: dict[str, np.ndarray] = {}

    def after_first_step(approx, losses, i):  # q just after the start (one step from it)
        if not first:
            first["mean"], first["cov"] = np.array(approx.mean), np.array(approx.cov)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        approx = inf.fit(None, progressbar=False, callbacks=[after_first_step])
    flat_mean, flat_cov = np.array(approx.mean), np.array(approx.cov)
    wall = time.perf_counter() - t0
    layout = [(v.rv_name, v.name, v.start, v.stop) for v in approx.adapter.layout]
    conv, start = inf.convergence, inf.start_report
    rows_per_step = inf._rows_per_step()
    inf.close()
    return {"wall_s": wall, "build_s": built, "fit_s": wall - built,
            "gradient_evaluations": int(inf.gradient_evaluations), "steps": int(inf.state.step),
            "converged": bool(inf.converged), "reason": conv.reason, "phases": len(conv.phases),
            "rows_per_step": rows_per_step, "start_report": start.as_dict() if start else None,
            "convergence": conv.as_dict(), "layout": layout, "mean": flat_mean, "cov": flat_cov,
            "first": first, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


def student(args) -> dict[str, Any]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = write_student_zarr(workdir / f"student_{args.rows}x{ST_D}.zarr", args.rows)
    print(f"# Student-t store {path} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    lap = laplace(path)
    names = ["alpha"] + [f"beta[{j}]" for j in range(ST_D)] + ["log sigma", "log nu"]
    print(f"# Laplace: {lap['seconds']:.1f} s, {lap['evaluations']} numpy evaluations, |grad| at MAP "
          f"{lap['grad_norm_at_map']:.2e}; MAP sigma {np.exp(lap['map'][-2]):.4f}, nu {np.exp(lap['map'][-1]):.3f}; "
          f"sds " + ", ".join(f"{s:.2e}" for s in lap["sd"]), flush=True)
    ray = start_local_ray()
    runs = []
    try:
        for r in range(args.st_repeats):
            try:
                res = st_distvi(path, args.seed + r, args)
            except Exception:
                print(f"# Student-t distvi FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                runs.append({"failed": traceback.format_exc(limit=3)})
                continue
            order = [v[0] for v in res["layout"]]
            assert order == ["alpha", "beta", "sigma", "nu"], order
            res["accuracy"] = accuracy(res.pop("mean"), res.pop("cov"), lap["map"], lap["cov"])
            first = res.pop("first")
            res["accuracy_after_step_1"] = (accuracy(first["mean"], first["cov"], lap["map"], lap["cov"])
                                            if first else None)
            sr = res["start_report"] or {}
            res["ms_per_step"] = 1e3 * (res["fit_s"] - sr.get("seconds", 0.0)) / max(res["steps"], 1)
            runs.append(res)
            a, sr = res["accuracy"], res["start_report"] or {}
            print(f"# Student-t repeat {r + 1}/{args.st_repeats}: {res['wall_s']:.1f} s (build {res['build_s']:.1f} s), "
                  f"{res['reason']} after {res['steps']} steps in {res['phases']} phases, "
                  f"{res['gradient_evaluations']:,} gradient evaluations (start: {sr.get('gradient_evaluations')} "
                  f"full-data, {sr.get('seconds', float('nan')):.1f} s); sd/Laplace "
                  + ", ".join(f"{v:.3f}" for v in a["sd_ratio"])
                  + f"; mean err {a['max_mean_err_sd']:.3f} sd", flush=True)
    finally:
        ray.shutdown()
    ok = [r for r in runs if "failed" not in r]
    worst = max((r["accuracy"]["max_sd_rel_err"] for r in ok), default=None)
    return {"config": {"rows": args.rows, "d": ST_D, "nu": ST_NU, "sigma": ST_SIGMA, "alpha": ST_ALPHA,
                       "corr": ST_CORR, "beta": st_truth().tolist(), "batch_per_shard": args.batch, "num_workers": 2,
                       "chunk_rows": ST_CHUNK, "repeats": args.st_repeats, "path": path},
            "names": names,
            "laplace": {k: (lap[k].tolist() if isinstance(lap[k], np.ndarray) else lap[k])
                        for k in ("map", "sd", "cov", "grad_norm_at_map", "min_hessian_eig", "lbfgs",
                                  "evaluations", "seconds", "density_check")},
            "summary": {"wall_s_median": median([r["wall_s"] for r in ok]),
                        "gradient_evaluations_median": median([r["gradient_evaluations"] for r in ok]),
                        "max_sd_rel_err_worst": worst,
                        "max_mean_err_sd_worst": max((r["accuracy"]["max_mean_err_sd"] for r in ok), default=None),
                        "converged": sum(r["converged"] for r in ok), "runs": len(runs), "ok": len(ok)},
            "target": f"every sd within {100 * SD_TARGET:g} % of Laplace's",
            "target_met": bool(ok) and worst is not None and worst <= SD_TARGET, "runs": runs}


# ============================================================================ report
def table(result: dict[str, Any]) -> str:
    lines = ["| case | tool | wall s | gradient evaluations | max sd error | max mean error | "
             "wall vs distvi | converged |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    conj = result.get("conjugate")
    if conj:
        s, ratios = conj["summary"], conj["ratios"]
        n = conj["config"]["repeats"]
        labels = {"distvi": "distvi `fit(None)`, defaults",
                  "pymc": "pm.fit, adam 0.005/0.001/0.0002 x 10k, 4 draws",
                  "numpyro": "NumPyro SVI, same schedule, 4 particles"}
        for k in ("distvi", "pymc", "numpyro"):
            if k not in s:
                if k == "numpyro":
                    lines.append(f"| conjugate 20k x 6 | {labels[k]} | {conj['numpyro']} | | | | | |")
                continue
            v = s[k]
            ratio = "1.00x" if k == "distvi" else fmt(ratios.get(f"{k}_over_distvi_wall"), ".2f") + "x"
            conv = f"{v['converged']}/{v['ok']}" if k == "distvi" else "(fixed steps)"
            lines.append(f"| conjugate 20k x 6 (median of {n}) | {labels[k]} | {fmt(v['wall_s_median'], '.2f')} | "
                         f"{fmt(v['gradient_evaluations_median'], ',.0f')} | "
                         f"{fmt(v['max_sd_rel_err_median'] and 100 * v['max_sd_rel_err_median'], '.2f')} % | "
                         f"{fmt(v['max_mean_err_sd_median'], '.3f')} sd | {ratio} | {conv} |")
    st = result.get("student")
    if st:
        s = st["summary"]
        ok = [r for r in st["runs"] if "failed" not in r]
        lap = st["laplace"]
        for r in ok:
            a = r["accuracy"]
            lines.append(f"| Student-t {st['config']['rows']:,} x {ST_D}, Zarr, 2 Ray workers, batch "
                         f"{st['config']['batch_per_shard']:,}/shard | distvi `fit(None)` vs Laplace | "
                         f"{r['wall_s']:.1f} | {r['gradient_evaluations']:,} | {100 * a['max_sd_rel_err']:.2f} % | "
                         f"{a['max_mean_err_sd']:.3f} sd | | {r['reason']} |")
        lines.append(f"| (reference) | Laplace at the MAP, numpy/scipy | {lap['seconds']:.1f} | "
                     f"{lap['evaluations']} full-data | — | — | | |")
        if not ok:
            lines.append(f"| Student-t {st['config']['rows']:,} | distvi `fit(None)` | FAILED | | | | | |")
    return "\n".join(lines)


def verdicts(result: dict[str, Any]) -> list[str]:
    out = []
    conj = result.get("conjugate")
    if conj:
        r = conj["ratios"].get("pymc_over_distvi_wall")
        out.append(f"conjugate: pm.fit wall / distvi wall = {fmt(r, '.2f')}x; target >= {SPEED_TARGET:g}x: "
                   + ("met" if conj["target_met"] else "NOT met"))
        if "numpyro_over_distvi_wall" in conj["ratios"]:
            out.append(f"conjugate: NumPyro wall / distvi wall = {fmt(conj['ratios']['numpyro_over_distvi_wall'], '.2f')}x")
        else:
            out.append(f"conjugate: NumPyro {conj['numpyro']}")
    st = result.get("student")
    if st:
        s = st["summary"]
        ok = [r for r in st["runs"] if "failed" not in r]
        out.append(f"Student-t: worst sd error against Laplace {fmt(s['max_sd_rel_err_worst'] and 100 * s['max_sd_rel_err_worst'], '.2f')} %; "
                   f"target <= {100 * SD_TARGET:g} %: " + ("met" if st["target_met"] else "NOT met"))
        for r in ok:
            sr = r["start_report"] or {}
            out.append(f"Student-t: start {sr.get('method')} ({sr.get('iterations')} L-BFGS iterations, "
                       f"{sr.get('gradient_evaluations')} full-data gradients, {sr.get('density_evaluations')} "
                       f"full-data densities, {sr.get('seconds', float('nan')):.1f} s, {sr.get('message')!r}); "
                       f"then {r['steps']:,} steps x {r['rows_per_step']:,} rows in {r['phases']} phases; "
                       f"reason {r['reason']!r}; fit {r['fit_s']:.1f} s after {r['build_s']:.1f} s building")
            a1 = r["accuracy_after_step_1"]
            if a1:
                out.append(f"Student-t: q one step after the start: sd error {100 * a1['max_sd_rel_err']:.2f} %, "
                           f"mean error {a1['max_mean_err_sd']:.3f} sd; steps after it {r['ms_per_step']:.2f} ms each")
            out.append("Student-t: phases (rate, steps, outcome, change): " + "; ".join(
                f"{p['learning_rate']:g}, {p['end_step'] - p['start_step']:,}, {p['outcome']}, {p['change']:.3f}"
                for p in r["convergence"]["phases"]))
            out.append("Student-t: sd / Laplace sd: " + ", ".join(
                f"{n} {v:.3f}" for n, v in zip(st["names"], r["accuracy"]["sd_ratio"])))
            out.append("Student-t: mean error in Laplace sds: " + ", ".join(
                f"{n} {v:+.3f}" for n, v in zip(st["names"], r["accuracy"]["mean_err_sd"])))
            if r["warnings"]:
                out.append("Student-t warnings: " + "; ".join(r["warnings"]))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="Student-t rows (default 1,000,000)")
    ap.add_argument("--batch", type=int, default=5_000, help="Student-t rows per shard per step")
    ap.add_argument("--phase-steps", dest="phase_steps", type=int, default=10_000,
                    help="steps per learning rate of the hand-annealed schedule")
    ap.add_argument("--repeats", type=int, default=3, help="conjugate repeats (interleaved)")
    ap.add_argument("--st-repeats", dest="st_repeats", type=int, default=1, help="Student-t repeats")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["conjugate", "student"], help="run one case")
    ap.add_argument("--no-numpyro", action="store_true", help="skip NumPyro even when it is installed")
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parent / "data"))
    ap.add_argument("--quick", action="store_true", help="100,000 Student-t rows, one repeat")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.repeats, args.st_repeats = 1, 1
        if args.rows == parser().get_default("rows"):
            args.rows = 100_000
    quiet_logs("distvi")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "fit_until_converged", "quick": args.quick,
                              "environment": environment()}
    if args.only in (None, "conjugate"):
        result["conjugate"] = conjugate(args)
    if args.only in (None, "student"):
        result["student"] = student(args)
    result["seconds"] = time.perf_counter() - t0
    text = table(result)
    lines = verdicts(result)
    print("\n" + text + "\n\n" + "\n".join(lines))
    result["table"], result["verdicts"] = text, lines
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
