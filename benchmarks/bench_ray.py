"""Ray backend benchmarks: per-step overhead, compute scaling, driver memory.

Three measurements (each prints a Markdown table; ratios are taken within one run):

overhead
    A tiny model (2 coefficients, 64 rows per shard, full shard per step): seconds per step
    for 1, 2 and 4 workers on the local backend, on Ray with plain actor calls, with a
    compiled graph, and over the direct path.
scaling
    Logistic regression, N x D from a Zarr store written once under ``--workdir``, batch of
    ``--batch`` rows per worker per step: rows per second for 1 and 2 workers.
memory
    Peak RSS of the driver process (a fresh subprocess per size) for the scaling job with
    10,000 and with ``--rows`` rows in the Zarr store: the driver reads only metadata.
crossover
    Steady-state ms per step of the local backend (two in-process shards) against Ray with
    two workers (``path="auto"``, 1 CPU each), logistic regression, over a grid of rows per
    shard per step (``--batches``) x columns (``--columns``); each shard holds twice its
    batch. Steps are timed with ``refine`` after a warm-up fit, so start-up and compilation
    are left out.

startup
    The call-to-result benchmark: each run a fresh process that builds the quickstart's
    model (254k x 7 logistic regression), then times ``ADVI(..., num_workers=2,
    batch_size=1000)``, ``fit(3000)`` and ``close()``, on the local backend and on Ray
    (a new local instance each time), alternating, ``--repeats`` times each; Ray's runs
    also time their phases (Ray joined, workers asked for, workers ready, the steps).

Usage
-----
    .venv/bin/python benchmarks/bench_ray.py overhead
    .venv/bin/python benchmarks/bench_ray.py scaling --rows 2000000 --dim 100 --batch 20000
    .venv/bin/python benchmarks/bench_ray.py memory --rows 2000000 --dim 100
    .venv/bin/python benchmarks/bench_ray.py crossover --batches 1000,10000,50000 --columns 7,100
    .venv/bin/python benchmarks/bench_ray.py startup --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (local_ray_without_auth, logistic_factory, refine_seconds,  # noqa: E402
                     start_local_ray, write_result)

local_ray_without_auth()  # at import: the memory child runs this module as its script too


def tiny_factory(data):
    import pymc as pm

    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=2)
        pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
    return m


def seconds_per_step(inference, n: int) -> float:
    import distvi as dv

    inference.fit(20, obj_optimizer=dv.adam(learning_rate=0.01), progressbar=False)  # warm
    return refine_seconds(inference, n) / n


def overhead(args) -> dict:
    import distvi as dv

    ray = start_local_ray()
    rows = {}
    for k in (1, 2, 4):
        rng = np.random.default_rng(k)
        X = rng.normal(size=(64 * k, 2))
        data = {"X": X, "y": X @ [1.0, -1.0] + rng.normal(size=64 * k)}
        row = {}
        for name, backend, opts in [("local", "local", None),
                                    ("ray plain", "ray", {"path": "plain", "num_cpus": 0.5}),
                                    ("ray compiled", "ray", {"path": "compiled", "num_cpus": 0.5}),
                                    ("ray direct", "ray", {"path": "direct", "num_cpus": 0.5})]:
            inf = dv.ADVI(model=tiny_factory, data=data, num_workers=k, backend=backend,
                          random_seed=1, backend_options=opts)
            with inf:
                row[name] = seconds_per_step(inf, args.steps)
        rows[k] = row
        print(f"# {k} worker(s): " + ", ".join(f"{n} {1e3 * v:.2f} ms" for n, v in row.items()),
              file=sys.stderr)
    ray.shutdown()
    print("\n| workers | local ms/step | ray plain ms/step | ray compiled ms/step | "
          "ray direct ms/step | plain/direct |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {1e3 * r['local']:.3f} | {1e3 * r['ray plain']:.3f} | "
              f"{1e3 * r['ray compiled']:.3f} | {1e3 * r['ray direct']:.3f} | "
              f"{r['ray plain'] / r['ray direct']:.2f}x |")
    return {"overhead_s_per_step": rows}


def write_zarr(path: Path, rows: int, dim: int, chunk_rows: int = 10_000) -> str:
    import zarr

    if (path / "zarr.json").exists():
        g = zarr.open_group(str(path), mode="r")
        if g["X"].shape == (rows, dim):
            return str(path)
    g = zarr.open_group(str(path), mode="w")
    X = g.create_array("X", shape=(rows, dim), chunks=(chunk_rows, dim), dtype="float64")
    y = g.create_array("y", shape=(rows,), chunks=(chunk_rows,), dtype="int64")
    w = np.random.default_rng(0).normal(0.0, 0.3, dim)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        rng = np.random.default_rng(start)
        block = rng.normal(size=(stop - start, dim))
        X[start:stop] = block
        y[start:stop] = (rng.random(stop - start) < 1 / (1 + np.exp(-block @ w))).astype("int64")
    return str(path)


def scaling(args) -> dict:
    import distvi as dv

    path = write_zarr(Path(args.workdir) / f"logreg_{args.rows}x{args.dim}.zarr", args.rows, args.dim)
    ray = start_local_ray()
    out = {}
    for k in (1, 2):
        inf = dv.ADVI(model=logistic_factory, data=dv.data.ZarrSource(path), batch_size=args.batch,
                      num_workers=k, backend="ray", random_seed=1,
                      backend_options={"num_cpus": 1})
        with inf:
            s = seconds_per_step(inf, args.steps)
            chosen = {"path": inf._backend.fast_path or "plain"}
        out[k] = {"s_per_step": s, "rows_per_s": k * args.batch / s, **chosen}
        print(f"# {k} worker(s): path {chosen}", file=sys.stderr)
        print(f"# {k} worker(s): {1e3 * s:.1f} ms/step, {k * args.batch / s:,.0f} rows/s", file=sys.stderr)
    ray.shutdown()
    ratio = out[2]["rows_per_s"] / out[1]["rows_per_s"]
    print(f"\n| workers | ms/step | rows/s |\n|---:|---:|---:|")
    for k, r in out.items():
        print(f"| {k} | {1e3 * r['s_per_step']:.1f} | {r['rows_per_s']:,.0f} |")
    print(f"\n2 vs 1 worker throughput: {ratio:.2f}x")
    return {"scaling": out, "ratio": ratio}


def memory_child(path: str, steps: int, batch: int) -> None:
    import distvi as dv

    ray = start_local_ray()
    inf = dv.ADVI(model=logistic_factory, data=dv.data.ZarrSource(path), batch_size=batch,
                  num_workers=2, backend="ray", random_seed=1, backend_options={"num_cpus": 1})
    with inf:
        inf.fit(steps, progressbar=False)
    ray.shutdown()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(args) -> dict:
    out = {}
    for rows in sorted({10_000, max(args.rows // 10, 10_000), args.rows}):
        path = write_zarr(Path(args.workdir) / f"logreg_{rows}x{args.dim}.zarr", rows, args.dim)
        res = subprocess.run([sys.executable, __file__, "memory-child", path, str(args.steps),
                              str(min(args.batch, rows // 2))],
                             capture_output=True, text=True, check=True)
        out[rows] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"# {rows:,} rows: driver peak RSS {out[rows]:.0f} MB", file=sys.stderr)
    small, large = out[10_000], out[args.rows]
    sizes = np.array(list(out), dtype=float)
    slope = float(np.polyfit(sizes / 1e6, np.array(list(out.values())), 1)[0])
    print(f"\n| rows in the store | driver peak RSS MB |\n|---:|---:|")
    for rows, mb in out.items():
        print(f"| {rows:,} | {mb:.0f} |")
    print(f"\ndifference: {large - small:+.0f} MB; slope {slope:+.2f} MB per million rows")
    return {"peak_rss_mb": out, "slope_mb_per_million_rows": slope}


def steady_ms_per_step(inference, target_s: float) -> tuple[float, int]:
    """ms per step of ``refine`` after a warm-up fit, over enough steps for ``target_s``."""
    import distvi as dv

    inference.fit(20, obj_optimizer=dv.adam(learning_rate=0.01), progressbar=False)  # compile, warm
    probe = refine_seconds(inference, 10) / 10
    n = int(min(max(target_s / probe, 20), 20_000))
    return 1e3 * refine_seconds(inference, n) / n, n


def crossover(args) -> dict:
    import distvi as dv

    batches = [int(b) for b in args.batches.split(",")]
    columns = [int(c) for c in args.columns.split(",")]
    ray = start_local_ray()
    out = {}
    for d in columns:
        for batch in batches:
            rng = np.random.default_rng(d * 1_000_003 + batch)
            rows = 2 * 2 * batch  # two shards, each twice its batch
            X = rng.normal(size=(rows, d))
            w = rng.normal(0.0, 0.3, d)
            data = {"X": X, "y": (rng.random(rows) < 1 / (1 + np.exp(-X @ w))).astype("int64")}
            cell = {}
            for name, backend, opts in [("local", "local", None),
                                        ("ray", "ray", {"num_cpus": 1, "path": "auto"})]:
                inf = dv.ADVI(model=logistic_factory, data=data, batch_size=batch, num_workers=2,
                              backend=backend, random_seed=1, backend_options=opts)
                with inf:
                    ms, n = steady_ms_per_step(inf, args.target_s)
                    path = getattr(inf._backend, "fast_path", None) or getattr(inf._backend, "path", None)
                cell[name] = {"ms_per_step": ms, "steps": n, **({"path": path} if path else {})}
            cell["local_over_ray"] = cell["local"]["ms_per_step"] / cell["ray"]["ms_per_step"]
            out[f"{batch}x{d}"] = {"batch_per_shard": batch, "columns": d, **cell}
            print(f"# batch {batch:,} x {d}: local {cell['local']['ms_per_step']:.3f} ms, ray "
                  f"{cell['ray']['ms_per_step']:.3f} ms ({cell['ray'].get('path')}), "
                  f"local/ray {cell['local_over_ray']:.2f}x", file=sys.stderr)
    ray.shutdown()
    print("\n| rows per shard per step | columns | local ms/step | ray ms/step (path) | local / ray |")
    print("|---:|---:|---:|---:|---:|")
    for r in out.values():
        print(f"| {r['batch_per_shard']:,} | {r['columns']} | {r['local']['ms_per_step']:.3f} | "
              f"{r['ray']['ms_per_step']:.3f} ({r['ray'].get('path')}) | {r['local_over_ray']:.2f}x |")
    return {"crossover": out}


def startup_child(backend: str, steps: int) -> None:
    """One timed call to result in this fresh process; prints JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.quickstart import load, model

    import distvi as dv
    from distvi.backends import ray as ray_backend
    from distvi.backends import ray_cluster
    from distvi.driver import loop

    marks: dict[str, float] = {}

    def timed(owner, name, at_start=None, at_end=None):
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            if at_start:
                marks.setdefault(at_start, time.perf_counter())
            out = inner(*a, **k)
            if at_end:
                marks.setdefault(at_end, time.perf_counter())
            return out
        setattr(owner, name, wrapper)

    timed(ray_cluster, "_join_or_start", "ray_init_start", "ray_init_done")
    timed(ray_backend.RayBackend, "_launch", None, "workers_asked")
    timed(ray_backend.RayBackend, "_open_fast", "workers_ready")
    timed(loop.Loop, "run", "steps_start", "steps_done")
    data = load()
    m = model(data)
    t0 = time.perf_counter()
    inf = dv.ADVI(model=m, batch_size=1000, num_workers=2, backend=backend, random_seed=1)
    approx = inf.fit(steps, obj_optimizer=dv.adam(learning_rate=0.01), progressbar=False)
    inf.close()
    total = time.perf_counter() - t0
    print(json.dumps({"seconds": total, "mean": np.asarray(approx.mean).tolist(),
                      "marks": {k: v - t0 for k, v in marks.items()}}))


def startup(args) -> dict:
    runs: dict[str, list] = {"local": [], "ray": []}
    for _ in range(args.repeats):
        for backend in ("local", "ray"):
            res = subprocess.run([sys.executable, __file__, "startup-child", backend, str(args.steps)],
                                 capture_output=True, text=True, check=True)
            runs[backend].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"# {backend}: {runs[backend][-1]['seconds']:.2f} s", file=sys.stderr)
    same = all(r["mean"] == runs["ray"][0]["mean"] for r in runs["ray"])
    diff = float(np.max(np.abs(np.subtract(runs["ray"][0]["mean"], runs["local"][0]["mean"]))))
    med = {b: float(np.median([r["seconds"] for r in rs])) for b, rs in runs.items()}
    print(f"\n| backend | call to result, s (runs) | median |\n|---|---|---:|")
    for b, rs in runs.items():
        seconds = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"| {b} | {seconds} | {med[b]:.2f} |")
    print(f"\nray / local: {med['ray'] / med['local']:.2f}x; Ray's runs identical to each other: {same}; "
          f"max |mean ray - mean local| = {diff:.1e}")
    phases = [("ray_init_start", "ray_init_done", "Ray joined (a new local instance)"),
              ("ray_init_done", "workers_asked", "placement group, shards put, actors asked for"),
              ("workers_asked", "workers_ready", "workers: start, import, load, compile, warm-up"),
              ("steps_start", "steps_done", f"{args.steps} steps"),
              ("steps_done", None, "close")]
    print("\n| Ray phase (median over runs) | from, s | to, s |\n|---|---:|---:|")
    for a, b, what in phases:
        lo = np.median([r["marks"].get(a, np.nan) for r in runs["ray"]])
        hi = np.median([r["marks"].get(b, np.nan) if b else r["seconds"] for r in runs["ray"]])
        print(f"| {what} | {lo:.2f} | {hi:.2f} |")
    return {"startup": runs, "median_s": med, "ratio": med["ray"] / med["local"],
            "ray_runs_identical": same, "max_abs_mean_diff_ray_local": diff}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "startup-child":
        startup_child(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["overhead", "scaling", "memory", "crossover", "startup"])
    ap.add_argument("--repeats", type=int, default=3, help="startup: runs per backend")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--batch", type=int, default=20_000)
    ap.add_argument("--workdir", default="benchmarks/data")
    ap.add_argument("--batches", default="1000,10000,50000", help="crossover: rows per shard per step")
    ap.add_argument("--columns", default="7,100", help="crossover: columns of X")
    ap.add_argument("--target-s", type=float, default=1.5, help="crossover: seconds of timed steps per cell")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = {"overhead": overhead, "scaling": scaling, "memory": memory,
              "crossover": crossover, "startup": startup}[args.what](args)
    result["date"] = time.strftime("%Y-%m-%d")
    write_result(Path(args.out or f"benchmarks/results/ray_{args.what}.json"), result)


if __name__ == "__main__":
    main()
