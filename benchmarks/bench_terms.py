"""Benchmark: a shard worker's data term in each compiled form, by size.

A Ray worker (and an in-process worker of a fit that does not run in fused blocks, such as
SVGD) evaluates the model's log-likelihood and gradient on its minibatch window every step.
This measures one such evaluation, compiled in C (PyTensor's C backend with the linked
OpenBLAS; the window a view of the shuffled shard) and in JAX (PyTensor's JAX backend; the
shard's rows on the device once, the window a dynamic slice), for a logistic regression at
the Ray benchmark's batch sizes (1k, 20k and 100k rows a step, 20 and 100 columns, one point)
and at SVGD's (2,000 rows, 10 columns, 100 and 500 particles). It reports microseconds per
evaluation (median of ``--repeats`` timings of ``--calls`` calls each) and which form
``DISTVI_TERM_FORM=auto`` picks at that size.

Usage
-----
    .venv/bin/python benchmarks/bench_terms.py
    .venv/bin/python benchmarks/bench_terms.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, logistic_factory, write_result  # noqa: E402

DEFAULT_OUT = RESULTS / "terms.json"
SIZES = [(1_000, 20, 1), (20_000, 20, 1), (100_000, 20, 1), (1_000, 100, 1), (20_000, 100, 1),
         (100_000, 100, 1), (2_000, 10, 100), (2_000, 10, 500)]


def worker_for(rows: int, cols: int, batch: int, seed: int = 3):
    """A shard worker over ``rows`` rows of a logistic regression, ``batch`` rows a step."""
    from distvi.model import adapt
    from distvi.worker import ShardWorker, compiled_by_points

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, cols))
    y = rng.integers(0, 2, size=rows)
    adapter, source = adapt(logistic_factory, {"X": X, "y": y})
    term = compiled_by_points(adapter.data_term())
    return ShardWorker(source.read(0, rows), 0, seed, batch, term), adapter.ndim


def time_form(worker, ndim: int, n_points: int, form: str, calls: int, repeats: int) -> float:
    os.environ["DISTVI_TERM_FORM"] = form
    points = np.random.default_rng(0).normal(scale=0.1, size=(n_points, ndim))
    worker.evaluate(points, 0)  # compiles
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            worker.evaluate(points, r * calls + i)
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.repeats = 20, 2
    from distvi.worker import term_form

    rows_out = []
    print("| rows a step | columns | points | C us | JAX us | JAX / C | auto picks |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for batch, cols, n_points in SIZES:
        shard = max(2 * batch, 4_000)
        worker, ndim = worker_for(shard, cols, batch)
        calls = max(5, args.calls // max(1, batch * n_points // 20_000))
        c = time_form(worker, ndim, n_points, "c", calls, args.repeats)
        j = time_form(worker, ndim, n_points, "jax", calls, args.repeats)
        os.environ["DISTVI_TERM_FORM"] = "auto"
        picks = term_form(batch, n_points, ndim)
        rows_out.append({"rows": batch, "cols": cols, "points": n_points, "c_us": c, "jax_us": j,
                         "auto": picks})
        print(f"| {batch:,} | {cols} | {n_points} | {c:,.0f} | {j:,.0f} | {j / c:.2f} | {picks} |",
              flush=True)
    write_result(args.out, {"benchmark": "data_term_forms", "environment": environment(),
                            "config": vars(args) | {"out": str(args.out)}, "rows": rows_out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
