"""Benchmark: distvi (local backend) against ``pymc.fit`` on a minibatch logistic regression.

The problem (from the issue): N=200,000 rows, D=20 features, batch 1,000, mean-field ADVI,
``adam(learning_rate=0.01)``, 10,000 iterations, ``random_seed=1``. Both tools run in the
same process, interleaved (pymc, distvi, pymc, distvi, ...) because the machine is shared
and noisy; medians over ``--repeats`` are reported.

What is measured, per repeat and per tool
-----------------------------------------
wall incl. compile
    One from-scratch fit of ``--n`` iterations, timed around everything the user waits for:
    for PyMC, building the model (``pm.Model`` + ``pm.Minibatch`` + the distributions) and
    the whole ``pm.fit(...)`` call (graph building, compilation, iterations); for distvi the
    whole ``dv.fit(...)`` call (which calls the model factory, compiles, and iterates).
    The fitted mean of this run is the one compared with the reference.
it/s
    Iterations alone, compilation excluded: a fresh ``ADVI`` object is fitted for ``--warm``
    iterations (this compiles the step), then ``inference.refine(n)`` is timed. ``refine``
    reuses the compiled step and the optimizer state in both libraries, so the timed region
    is just the ``n`` iterations of the training loop (loss recorded every step, no
    progress bar, as in the wall-time fit).

Accuracy
--------
The reference is the MAP of the full-data posterior (Newton's method in numpy, step
< 1e-12), which equals the posterior mean up to O(1/N). The error is
``max_i |mean_i - map_i|``; in sd units it is ``max_i |mean_i - map_i| / sd_i`` with
``sd = sqrt(diag(H^-1))`` at the MAP (Laplace approximation, H the negative Hessian of the
log posterior).

No timing is asserted anywhere: this is a measurement script.

Usage
-----
    .venv/bin/python benchmarks/bench_advi.py               # full run (several minutes)
    .venv/bin/python benchmarks/bench_advi.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (D, DATA_SEED, FIT_SEED, LEARNING_RATE, RESULTS,  # noqa: E402
                     distvi_factory, environment, fmt, make_data, median, quiet_logs,
                     refine_seconds, write_result)

PROFILE_STEPS = 2000
# (label, DISTVI_BLOCK_FORM, fused) of the extra distvi rows; the main row is distvi's default
FORMS = (("fused, C scan", "c", True), ("fused, JAX", "jax", True), ("per step", None, False))
DEFAULT_OUT = RESULTS / "advi.json"


# ---------------------------------------------------------------------------- data & reference
def newton_map(X: np.ndarray, y: np.ndarray, prior_sd: float = 1.0, tol: float = 1e-12,
               max_iter: int = 100) -> dict[str, Any]:
    """MAP of w ~ N(0, prior_sd^2 I), y ~ Bernoulli(logit_p = X w) on the full data.

    Returns the MAP, the Laplace sd (sqrt of the diagonal of the inverse negative Hessian),
    the number of Newton steps and the last step's max abs size.
    """
    n, d = X.shape
    w = np.zeros(d)
    prec = 1.0 / prior_sd**2
    yf = y.astype(np.float64)
    last = np.inf
    for it in range(1, max_iter + 1):
        eta = X @ w
        p = 0.5 * (1.0 + np.tanh(0.5 * eta))          # sigmoid, overflow-free
        grad = X.T @ (yf - p) - prec * w
        H = (X * (p * (1.0 - p))[:, None]).T @ X + prec * np.eye(d)   # negative Hessian
        step = np.linalg.solve(H, grad)
        w = w + step
        last = float(np.max(np.abs(step)))
        if last < tol:
            break
    else:
        raise RuntimeError(f"Newton did not converge to {tol} in {max_iter} steps (last step {last:.3g})")
    eta = X @ w
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))
    H = (X * (p * (1.0 - p))[:, None]).T @ X + prec * np.eye(d)
    sd = np.sqrt(np.diag(np.linalg.inv(H)))
    return {"map": w, "sd": sd, "newton_steps": it, "last_step": last}


def accuracy(mean: np.ndarray, std: np.ndarray | None, ref: dict[str, Any]) -> dict[str, float]:
    mean = np.asarray(mean, dtype=np.float64).ravel()
    err = np.abs(mean - ref["map"])
    out = {
        "max_abs_mean_err": float(err.max()),
        "max_mean_err_sd_units": float(np.max(err / ref["sd"])),
    }
    if std is not None:
        ratio = np.asarray(std, dtype=np.float64).ravel() / ref["sd"]
        out["sd_ratio_min"] = float(ratio.min())
        out["sd_ratio_max"] = float(ratio.max())
    return out


# ---------------------------------------------------------------------------- PyMC
def pymc_model(X: np.ndarray, y32: np.ndarray, batch: int):
    """The model as PyMC's docs write a minibatch model (int32 observed: see the note in main)."""
    import pymc as pm

    with pm.Model() as model:
        X_mb, y_mb = pm.Minibatch(X, y32, batch_size=batch)
        w = pm.Normal("w", 0.0, 1.0, shape=X.shape[1])
        pm.Bernoulli("obs", logit_p=X_mb @ w, observed=y_mb, total_size=X.shape[0])
    return model


def pymc_wall(X, y32, n, batch) -> dict[str, Any]:
    import pymc as pm

    t0 = time.perf_counter()
    model = pymc_model(X, y32, batch)
    with model:
        approx = pm.fit(n=n, method="advi", obj_optimizer=pm.adam(learning_rate=LEARNING_RATE),
                        random_seed=FIT_SEED, progressbar=False)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "mean": np.asarray(approx.mean.eval()), "std": np.asarray(approx.std.eval()),
            "final_loss": float(np.mean(approx.hist[-1000:]))}


def pymc_rate(X, y32, n, batch, warm) -> dict[str, Any]:
    import pymc as pm

    model = pymc_model(X, y32, batch)
    with model:
        inference = pm.ADVI(random_seed=FIT_SEED)
        t0 = time.perf_counter()
        inference.fit(warm, obj_optimizer=pm.adam(learning_rate=LEARNING_RATE), progressbar=False)
        warm_s = time.perf_counter() - t0
        iter_s = refine_seconds(inference, n)
    return {"warm_fit_s": warm_s, "iter_s": iter_s, "it_per_s": n / iter_s}


# ---------------------------------------------------------------------------- distvi
def distvi_wall(X, y, n, batch) -> dict[str, Any]:
    import distvi as dv

    t0 = time.perf_counter()
    approx = dv.fit(n, method="advi", model=distvi_factory, data={"X": X, "y": y}, batch_size=batch,
                    random_seed=FIT_SEED, obj_optimizer=dv.adam(learning_rate=LEARNING_RATE),
                    progressbar=False)
    wall = time.perf_counter() - t0
    hist = np.asarray(getattr(approx, "hist", np.zeros(0)))
    return {"wall_s": wall, "mean": np.asarray(approx.mean), "std": np.asarray(approx.std),
            "final_loss": float(np.mean(hist[-1000:])) if hist.size else None}


def distvi_rate(X, y, n, batch, warm, form: str | None = None, fused: bool = True):
    """Returns (result, inference); the inference is kept open for the profiling table.

    ``form``: the fused block's compiled form (``DISTVI_BLOCK_FORM``; None: distvi's
    default); ``fused=False``: the per-step path."""
    import os

    import distvi as dv

    saved = os.environ.get("DISTVI_BLOCK_FORM")
    if form is not None:
        os.environ["DISTVI_BLOCK_FORM"] = form
    try:
        inference = dv.ADVI(model=distvi_factory, data={"X": X, "y": y}, batch_size=batch,
                            random_seed=FIT_SEED, backend_options={"fused": fused})
        t0 = time.perf_counter()
        inference.fit(warm, obj_optimizer=dv.adam(learning_rate=LEARNING_RATE), progressbar=False)
        warm_s = time.perf_counter() - t0
        iter_s = refine_seconds(inference, n)
    finally:
        if saved is None:
            os.environ.pop("DISTVI_BLOCK_FORM", None)
        else:
            os.environ["DISTVI_BLOCK_FORM"] = saved
    final_loss = float(np.mean(inference.hist[-1000:])) if inference.hist.size else None
    return {"warm_fit_s": warm_s, "iter_s": iter_s, "it_per_s": n / iter_s,
            "final_loss_after_refine": final_loss}, inference


# ---------------------------------------------------------------------------- NumPyro (optional)
def numpyro_available() -> bool:
    try:
        import numpyro  # noqa: F401
    except ImportError:
        return False
    return True


def numpyro_rate(X, y, n, batch, warm) -> dict[str, Any]:
    """NumPyro SVI with a mean-field normal guide (``AutoNormal``), the same model, adam(0.01),
    and distvi's minibatch scheme: a window of ``batch`` rows at a random offset of the rows
    shuffled once, the likelihood scaled by N / batch. (``numpyro.plate(subsample_size=...)``
    draws a permutation of all N rows every step: 218 it/s at N = 20,000 here.) ``svi.run``
    compiles the whole loop (``lax.fori_loop``)."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    jax.config.update("jax_enable_x64", True)
    perm = np.random.default_rng(FIT_SEED).permutation(X.shape[0])
    Xj, yj = jnp.asarray(X[perm]), jnp.asarray(y[perm], dtype=jnp.float64)
    rows = X.shape[0]

    def model(Xd, yd):
        w = numpyro.sample("w", ndist.Normal(0.0, 1.0).expand([Xd.shape[1]]).to_event(1))
        start = jax.random.randint(numpyro.prng_key(), (), 0, rows - batch + 1)
        Xb = jax.lax.dynamic_slice_in_dim(Xd, start, batch)
        yb = jax.lax.dynamic_slice_in_dim(yd, start, batch)
        with numpyro.handlers.scale(scale=rows / batch):
            numpyro.sample("obs", ndist.Bernoulli(logits=Xb @ w).to_event(1), obs=yb)

    svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(LEARNING_RATE), Trace_ELBO())

    def timed(steps):
        t0 = time.perf_counter()
        res = svi.run(jax.random.PRNGKey(FIT_SEED), steps, Xj, yj, progress_bar=False)
        jax.block_until_ready(res.params)
        return time.perf_counter() - t0, res

    timed(warm)
    # each svi.run traces and compiles its loop again: the difference of a run of 2n steps
    # and one of n steps is n steps without the compile
    t_n, res = timed(n)
    t_2n, _ = timed(2 * n)
    return {"n_steps_s": t_n, "2n_steps_s": t_2n, "iter_s": t_2n - t_n,
            "it_per_s": n / max(t_2n - t_n, 1e-9),
            "mean": np.asarray(res.params["w_auto_loc"]), "std": np.asarray(res.params["w_auto_scale"]),
            "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__}}


# ---------------------------------------------------------------------------- reporting
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [r["wall"]["wall_s"] for r in runs if "wall" in r]
    rates = [r["rate"]["it_per_s"] for r in runs if "rate" in r]
    errs = [r["wall"]["accuracy"]["max_abs_mean_err"] for r in runs if "wall" in r]
    errs_sd = [r["wall"]["accuracy"]["max_mean_err_sd_units"] for r in runs if "wall" in r]
    sd_lo = [r["wall"]["accuracy"].get("sd_ratio_min") for r in runs if "wall" in r]
    sd_hi = [r["wall"]["accuracy"].get("sd_ratio_max") for r in runs if "wall" in r]
    return {
        "it_per_s_median": median(rates),
        "wall_incl_compile_s_median": median(walls),
        "max_abs_mean_err_median": median(errs),
        "max_mean_err_sd_units_median": median(errs_sd),
        "sd_ratio_min_median": median(sd_lo),
        "sd_ratio_max_median": median(sd_hi),
        "n_rate_runs": len(rates),
        "n_wall_runs": len(walls),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="ADVI iterations per fit (default 10000)")
    ap.add_argument("--rows", type=int, default=200000, help="rows N (default 200000)")
    ap.add_argument("--batch", type=int, default=1000, help="minibatch size (default 1000)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--warm", type=int, default=200,
                    help="iterations of the compile/warm-up fit before the timed refine (default 200)")
    ap.add_argument("--quick", action="store_true", help="smoke run: n=2000, rows=20000, repeats=1")
    ap.add_argument("--no-numpyro", action="store_true", help="skip NumPyro even when it is installed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rows, args.repeats = 2000, 20000, 1
    for name in ("n", "rows", "batch", "repeats", "warm"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")

    quiet_logs()  # pm.fit logs "Finished [100%]: Average Loss = ..." at INFO

    env = environment()
    X, y, w_true = make_data(args.rows)
    # PyMC: int32 observed for the minibatch (pm.Minibatch with an int64 observed is a known
    # problem); distvi gets the int64 labels as generated. Same values either way.
    y32 = y.astype(np.int32)
    t0 = time.perf_counter()
    ref = newton_map(X, y)
    ref_s = time.perf_counter() - t0
    print(f"# reference: Newton MAP in {ref['newton_steps']} steps (last step {ref['last_step']:.1e}, "
          f"{ref_s:.2f} s); Laplace sd {ref['sd'].min():.4f}..{ref['sd'].max():.4f}; "
          f"max |MAP - w_true| {np.abs(ref['map'] - w_true).max():.4f}", flush=True)

    pymc_runs: list[dict[str, Any]] = []
    numpyro_runs: list[dict[str, Any]] = []
    use_numpyro = numpyro_available() and not args.no_numpyro
    distvi_runs: list[dict[str, Any]] = []
    distvi_error: str | None = None
    profile_inf = None

    def run_distvi(kind: str, fn, run: dict[str, Any]):
        nonlocal distvi_error
        if distvi_error is not None:
            return None
        try:
            return fn()
        except Exception:
            distvi_error = traceback.format_exc()
            print(f"\n# distvi {kind} run FAILED:\n{distvi_error}", file=sys.stderr, flush=True)
            run["error"] = distvi_error
            return None

    for r in range(args.repeats):
        p_run: dict[str, Any] = {"repeat": r}
        d_run: dict[str, Any] = {"repeat": r}
        pymc_runs.append(p_run)
        distvi_runs.append(d_run)

        # 1. pymc wall   2. distvi wall   3. pymc it/s   4. distvi it/s
        res = pymc_wall(X, y32, args.n, args.batch)
        res["accuracy"] = accuracy(res.pop("mean"), res.pop("std"), ref)
        p_run["wall"] = res
        print(f"# repeat {r + 1}/{args.repeats}: pymc   wall {res['wall_s']:.2f} s, "
              f"err {res['accuracy']['max_abs_mean_err']:.2e}", flush=True)

        res = run_distvi("wall", lambda: distvi_wall(X, y, args.n, args.batch), d_run)
        if res is not None:
            res["accuracy"] = accuracy(res.pop("mean"), res.pop("std"), ref)
            d_run["wall"] = res
            print(f"# repeat {r + 1}/{args.repeats}: distvi wall {res['wall_s']:.2f} s, "
                  f"err {res['accuracy']['max_abs_mean_err']:.2e}", flush=True)

        res = pymc_rate(X, y32, args.n, args.batch, args.warm)
        p_run["rate"] = res
        print(f"# repeat {r + 1}/{args.repeats}: pymc   {res['it_per_s']:.0f} it/s", flush=True)

        out = run_distvi("it/s", lambda: distvi_rate(X, y, args.n, args.batch, args.warm), d_run)
        if out is not None:
            res, inf = out
            d_run["rate"] = res
            print(f"# repeat {r + 1}/{args.repeats}: distvi {res['it_per_s']:.0f} it/s", flush=True)
            if profile_inf is not None:
                profile_inf.close()
            profile_inf = inf

        # the other ways distvi can run the same steps: each compiled form of the fused
        # block, and the per-step path (its warm fit compiles the form the first time)
        for label, form, fused in FORMS:
            out = run_distvi(label, lambda: distvi_rate(X, y, args.n, args.batch, args.warm,
                                                        form, fused), d_run)
            if out is not None:
                d_run.setdefault("forms", {})[label] = out[0]
                out[1].close()
                print(f"# repeat {r + 1}/{args.repeats}: distvi {label}: {out[0]['it_per_s']:.0f} it/s "
                      f"(warm fit incl. compile {out[0]['warm_fit_s']:.2f} s)", flush=True)

        if use_numpyro:
            try:
                res = numpyro_rate(X, y, args.n, args.batch, args.warm)
                res["accuracy"] = accuracy(res.pop("mean"), res.pop("std"), ref)
                numpyro_runs.append({"repeat": r, "rate": res})
                print(f"# repeat {r + 1}/{args.repeats}: numpyro {res['it_per_s']:.0f} it/s", flush=True)
            except Exception:
                print(f"\n# numpyro run FAILED:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                use_numpyro = False

    profile_text = None
    profile_phases = None
    if profile_inf is not None:
        try:
            prof = profile_inf.run_profiling(PROFILE_STEPS)
            profile_text = str(prof)
            profile_phases = {k: float(v) for k, v in prof.phases.items()}
        except Exception:
            distvi_error = distvi_error or traceback.format_exc()
            print(f"\n# distvi run_profiling FAILED:\n{traceback.format_exc()}", file=sys.stderr)
        finally:
            profile_inf.close()

    p_sum = summarise(pymc_runs)
    n_rates = [r["rate"]["it_per_s"] for r in numpyro_runs]
    n_sum = {"it_per_s_median": median(n_rates), "n_rate_runs": len(n_rates),
             "max_abs_mean_err_median": median([r["rate"]["accuracy"]["max_abs_mean_err"]
                                                for r in numpyro_runs]),
             "max_mean_err_sd_units_median": median([r["rate"]["accuracy"]["max_mean_err_sd_units"]
                                                     for r in numpyro_runs]),
             "wall_incl_compile_s_median": median([r["rate"]["n_steps_s"] for r in numpyro_runs])}
    d_sum = summarise(distvi_runs)
    ratio = (d_sum["it_per_s_median"] / p_sum["it_per_s_median"]
             if d_sum["it_per_s_median"] and p_sum["it_per_s_median"] else None)
    wall_ratio = (p_sum["wall_incl_compile_s_median"] / d_sum["wall_incl_compile_s_median"]
                  if d_sum["wall_incl_compile_s_median"] and p_sum["wall_incl_compile_s_median"] else None)

    # ------------------------------------------------------------------ report
    lines = [
        "",
        f"## ADVI logistic regression: N={args.rows:,}, D={D}, batch={args.batch:,}, "
        f"n={args.n:,}, adam({LEARNING_RATE}), random_seed={FIT_SEED}, repeats={args.repeats}"
        + (" (--quick)" if args.quick else ""),
        "",
        "| tool | it/s (median) | wall incl. compile s | max abs mean err | err in sd units |",
        "|---|---:|---:|---:|---:|",
    ]
    tools = [("pymc.fit", p_sum), ("distvi (local)", d_sum)]
    if numpyro_runs:
        tools.append(("numpyro SVI (jit)", n_sum))
    for name, s in tools:
        lines.append(
            f"| {name} | {fmt(s['it_per_s_median'], ',.0f')} | {fmt(s['wall_incl_compile_s_median'], '.2f')} "
            f"| {fmt(s['max_abs_mean_err_median'], '.2e')} | {fmt(s['max_mean_err_sd_units_median'], '.3f')} |"
        )
    for label, _, _ in FORMS:
        rates = [r["forms"][label]["it_per_s"] for r in distvi_runs if label in r.get("forms", {})]
        warm = [r["forms"][label]["warm_fit_s"] for r in distvi_runs if label in r.get("forms", {})]
        lines.append(f"| distvi, {label} | {fmt(median(rates), ',.0f')} | (warm fit {fmt(median(warm), '.2f')}) | | |")
    lines += [
        "",
        f"ratio distvi/pymc it/s (medians of this run): {fmt(ratio, '.2f')}x  (issue target: >= 10x at equal accuracy)",
        ("ratio distvi/numpyro it/s: " + (fmt(d_sum["it_per_s_median"] / n_sum["it_per_s_median"], '.2f') + "x"
         if numpyro_runs and d_sum["it_per_s_median"] else "n/a (numpyro not installed)")),
        f"ratio pymc/distvi wall incl. compile (medians): {fmt(wall_ratio, '.2f')}x",
        "approx sd / Laplace sd (min..max over w, median over repeats): "
        f"pymc {fmt(p_sum['sd_ratio_min_median'], '.3f')}..{fmt(p_sum['sd_ratio_max_median'], '.3f')}, "
        f"distvi {fmt(d_sum['sd_ratio_min_median'], '.3f')}..{fmt(d_sum['sd_ratio_max_median'], '.3f')}",
        "",
        "per repeat (order: pymc wall, distvi wall, pymc it/s, distvi it/s):",
    ]
    for p_run, d_run in zip(pymc_runs, distvi_runs):
        pw = p_run.get("wall", {}).get("wall_s")
        dw = d_run.get("wall", {}).get("wall_s")
        pr = p_run.get("rate", {}).get("it_per_s")
        dr = d_run.get("rate", {}).get("it_per_s")
        lines.append(f"  repeat {p_run['repeat'] + 1}: pymc {fmt(pr, ',.0f')} it/s, wall {fmt(pw, '.2f')} s | "
                     f"distvi {fmt(dr, ',.0f')} it/s, wall {fmt(dw, '.2f')} s")
    lines += [
        "",
        "err: max_i |mean_i - MAP_i| of the from-scratch fit; sd units: max_i |mean_i - MAP_i| / sd_i, "
        "sd = sqrt(diag(H^-1)) at the MAP.",
        f"it/s: {args.n:,} iterations of inference.refine() after a {args.warm}-iteration fit that "
        "compiles the step (compile excluded).",
        "wall: PyMC model build + whole pm.fit(); whole dv.fit() (calls the factory). Compile included.",
        "",
        f"date: {env['date']}",
        f"cpu: processor={env['processor']!r} ({env['cpu_model']}, {env['machine']}), "
        f"os.cpu_count()={env['cpu_count']}, loadavg at start={env['loadavg_at_start']}",
        f"versions: python {env['python']}, pymc {env['pymc']}, pytensor {env['pytensor']}, "
        f"numpy {env['numpy']}, distvi {env['distvi']}; pytensor blas__ldflags={env['pytensor_blas_ldflags']!r} "
        f"(pymc.fit's), distvi links {env['distvi_blas']}",
    ]
    if profile_text is not None:
        lines += ["", f"distvi inf.run_profiling({PROFILE_STEPS}):", "```", profile_text, "```"]
    if distvi_error is not None:
        lines += ["", "distvi FAILED (traceback above on stderr, and in the JSON)."]
    print("\n".join(lines), flush=True)

    result = {
        "benchmark": "advi_logistic_regression",
        "config": {"rows": args.rows, "d": D, "batch": args.batch, "n": args.n, "repeats": args.repeats,
                   "warm": args.warm, "quick": args.quick, "optimizer": f"adam(learning_rate={LEARNING_RATE})",
                   "random_seed": FIT_SEED, "data_seed": DATA_SEED, "profile_steps": PROFILE_STEPS},
        "environment": env,
        "reference": {"method": "Newton MAP on the full data", "newton_steps": ref["newton_steps"],
                      "last_step": ref["last_step"], "map": ref["map"].tolist(), "sd": ref["sd"].tolist(),
                      "w_true": w_true.tolist()},
        "pymc": {"summary": p_sum, "runs": pymc_runs},
        "numpyro": {"summary": n_sum, "runs": numpyro_runs} if numpyro_runs else None,
        "distvi": {"summary": d_sum, "runs": distvi_runs, "error": distvi_error,
                   "profile": {"steps": PROFILE_STEPS, "phases_s": profile_phases, "table": profile_text}},
        "ratio_distvi_over_pymc_it_per_s": ratio,
        "ratio_pymc_over_distvi_wall": wall_ratio,
        "notes": {
            "it_per_s": "refine(n) after a warm fit that compiles the step; compile excluded",
            "wall": "PyMC: model build + pm.fit(); distvi: dv.fit() (factory call included); compile included",
            "err_sd_units": "max_i |mean_i - MAP_i| / sd_i, sd = sqrt(diag(inverse negative Hessian)) at MAP",
        },
    }
    write_result(args.out, result)
    return 1 if distvi_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
