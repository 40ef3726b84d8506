"""Benchmark: SVGD against ``pymc.fit(method='svgd')``, and the kernel work split across workers.

Part 1 — SVGD step speed (local backend, full data, as PyMC runs SVGD)
    Logistic regression, N rows x D features (default 2,000 x 10), 100 and 500 particles,
    ``adam(learning_rate=0.01)``. Each tool: a fresh ``SVGD`` fitted for a few steps (this
    compiles), then ``refine(n)`` is timed (iterations only). The tools alternate, ``--repeats``
    times; medians are reported with the ratio distvi/pymc it/s. Accuracy check: after the
    timed steps both particle means are printed next to each other.

Part 2 — kernel work on the workers (Ray backend, 2,048 particles x 100 dimensions)
    ``run_profiling`` splits a step into phases; the ``kernel`` phase is the bandwidth and the
    Stein direction. Three set-ups in one run: the driver doing it (1 worker,
    ``shard_kernel_above=inf``), 1 worker doing it, 2 workers doing it by slices of
    particles. The scaling figure is kernel(1 worker) / kernel(2 workers).

Part 3 — where the driver should stop doing it itself
    Kernel phase, driver vs 2 workers, for n in 256 .. 2,048 particles x 100 dimensions.

No timing is asserted anywhere: this is a measurement script.

Usage
-----
    .venv/bin/python benchmarks/bench_svgd.py            # full run (a few minutes)
    .venv/bin/python benchmarks/bench_svgd.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, logistic_factory, now_utc, refine_seconds,  # noqa: E402
                     start_local_ray, write_result)

DEFAULT_OUT = RESULTS / "svgd.json"


def logistic_data(rows: int, d: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, d)) / np.sqrt(d)
    w = rng.normal(size=d)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(X @ w)))).astype("int64")
    return X, y


def ready_model(X, y):
    import pymc as pm

    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=X.shape[1])
        pm.Bernoulli("y", logit_p=pm.math.dot(X, w), observed=y)
    return m


def time_pymc(X, y, particles, n, warm):
    import pymc as pm

    inference = pm.SVGD(n_particles=particles, model=ready_model(X, y), random_seed=1)
    inference.fit(warm, obj_optimizer=pm.adam(learning_rate=0.01), progressbar=False)
    return n / refine_seconds(inference, n), inference.approx.mean.eval()


def time_distvi(X, y, particles, n, warm):
    import distvi as dv

    inference = dv.SVGD(n_particles=particles, model=logistic_factory, data={"X": X, "y": y}, random_seed=1)
    inference.fit(warm, obj_optimizer=dv.adam(learning_rate=0.01), progressbar=False)
    return n / refine_seconds(inference, n), np.asarray(inference.approx.mean)


def part1(args) -> list[dict]:
    X, y = logistic_data(args.rows, args.dim)
    out = []
    for particles in args.particles:
        rates = {"pymc": [], "distvi": []}
        means = {}
        for _ in range(args.repeats):
            r, means["pymc"] = time_pymc(X, y, particles, args.n, args.warm)
            rates["pymc"].append(r)
            r, means["distvi"] = time_distvi(X, y, particles, args.n, args.warm)
            rates["distvi"].append(r)
        row = {
            "particles": particles,
            "pymc_it_s": statistics.median(rates["pymc"]),
            "distvi_it_s": statistics.median(rates["distvi"]),
            "all_pymc": rates["pymc"], "all_distvi": rates["distvi"],
            "max_abs_mean_diff": float(np.abs(means["pymc"] - means["distvi"]).max()),
        }
        row["ratio"] = row["distvi_it_s"] / row["pymc_it_s"]
        print(f"SVGD {particles:>4} particles: pymc {row['pymc_it_s']:8.1f} it/s   distvi "
              f"{row['distvi_it_s']:8.1f} it/s   ratio {row['ratio']:.2f}x   "
              f"|mean diff| {row['max_abs_mean_diff']:.3f}", flush=True)
        out.append(row)
    return out


def kernel_phase(particles, dim, workers, threshold, steps):
    import distvi as dv

    X, y = logistic_data(1000, dim)
    inference = dv.SVGD(n_particles=particles, model=logistic_factory, data={"X": X, "y": y},
                        random_seed=1, num_workers=workers, backend="ray",
                        shard_kernel_above=threshold)
    with inference:
        inference.fit(2, progressbar=False)
        profile = inference.run_profiling(steps)
        sharded = inference.kernel_sharded
    per = profile.per_step_us
    return {"kernel_ms": per["kernel"] / 1e3, "step_ms": sum(per.values()) / 1e3, "sharded": sharded}


def part2(args) -> dict:
    n, d = args.kernel_particles, 100
    setups = {"driver": (1, float("inf")), "1 worker": (1, 0.0), "2 workers": (2, 0.0)}
    res = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, (k, thr) in setups.items():
            res[name].append(kernel_phase(n, d, k, thr, args.kernel_steps))
    out = {}
    for name, runs in res.items():
        out[name] = {"kernel_ms": statistics.median(r["kernel_ms"] for r in runs),
                     "step_ms": statistics.median(r["step_ms"] for r in runs),
                     "sharded": runs[0]["sharded"]}
        print(f"{n} x {d}, {name:>9}: kernel {out[name]['kernel_ms']:7.1f} ms/step   "
              f"whole step {out[name]['step_ms']:7.1f} ms", flush=True)
    out["scaling_1_to_2_workers"] = out["1 worker"]["kernel_ms"] / out["2 workers"]["kernel_ms"]
    out["driver_over_2_workers"] = out["driver"]["kernel_ms"] / out["2 workers"]["kernel_ms"]
    print(f"kernel phase, 1 worker / 2 workers: {out['scaling_1_to_2_workers']:.2f}x   "
          f"driver / 2 workers: {out['driver_over_2_workers']:.2f}x", flush=True)
    return out


def part3(args) -> list[dict]:
    rows = []
    for n in args.sweep:
        drv = statistics.median(kernel_phase(n, 100, 2, float("inf"), args.kernel_steps)["kernel_ms"]
                                for _ in range(args.repeats))
        wrk = statistics.median(kernel_phase(n, 100, 2, 0.0, args.kernel_steps)["kernel_ms"]
                                for _ in range(args.repeats))
        rows.append({"particles": n, "n2D": n * n * 100, "driver_ms": drv, "workers_ms": wrk})
        print(f"n={n:>5} (n^2 D = {n * n * 100:.1e}): driver {drv:7.2f} ms   2 workers {wrk:7.2f} ms",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=10)
    ap.add_argument("--particles", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel-particles", type=int, default=2048)
    ap.add_argument("--kernel-steps", type=int, default=8)
    ap.add_argument("--sweep", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--no-kernel", action="store_true",
                    help="only the step speed against pymc (skip the Ray kernel measurements)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats, args.kernel_particles, args.kernel_steps = 30, 1, 512, 2
        args.sweep = [256]
    warnings.filterwarnings("ignore")
    logging.getLogger("pymc").setLevel(logging.ERROR)

    started = now_utc()
    results = {"date": started, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                            "platform": platform.platform()},
               "svgd_vs_pymc": part1(args)}
    if not args.no_kernel:
        ray = start_local_ray()
        try:
            results["kernel_sharding"] = part2(args)
            results["threshold_sweep"] = part3(args)
        finally:
            ray.shutdown()
    write_result(args.out, results)


if __name__ == "__main__":
    main()
