"""The Ray driver's own cost per step as shard workers grow (simulated: what 2 cores cannot show).

Each shard worker's compute is a fixed wait (``time.sleep``: no CPU), so that 2 to 32 workers
fit on this 2-core machine and what grows with their number is the driver's work: sending the
points, receiving the answers, adding them in rank order. Workers are :class:`ShardActor`
subclasses (no PyMC model, no compile) reserving 0.01 CPU each, run by :class:`RayBackend`
on its paths (``path="plain"``, ``"compiled"``, ``"direct"``); each answers gradients of the
points' size (D = 8 and D = 10,000 float64 values, one point a step).

For every number of workers N and each D, per step (medians over ``--steps`` timed steps after
``--warm`` steps):

- ``overhead``: the step's wall time minus the fixed wait (the slowest worker's own timing of
  its ``sleep``, as ``backend.last_compute_s`` reports it);
- ``driver CPU``: the driver process's CPU time (``time.process_time``: every thread, Ray's
  own included) during the step.

With ``--fan-out F`` the same actors are also driven through a
:class:`~distvi.backends.ray_tree.TreeReducer` (reducer actors, F children each) for every
N > F, by plain calls and as a compiled graph. Lines ``a + b N`` are fitted by least squares
to each series and extrapolated to 64 and 512 workers.

On 2 cores the wall-time overhead also holds the workers' and reducers' own CPU (waking,
(de)serialising) competing with the driver's; on a cluster those are spread over machines.
The driver's CPU per step is the figure that transfers.

Usage
-----
    .venv/bin/python benchmarks/bench_driver.py            # N = 2..32, D = 8 and 10,000
    .venv/bin/python benchmarks/bench_driver.py --quick    # N = 2, 4, 16; fewer steps
    .venv/bin/python benchmarks/bench_driver.py --table benchmarks/results/driver.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, local_ray_without_auth, start_local_ray, write_result  # noqa: E402

from distvi.backends.ray import RayBackend, ShardActor, WorkerSpec  # noqa: E402
from distvi.backends.ray_tree import TreeReducer, tree_levels  # noqa: E402
from distvi.data import ArraySource  # noqa: E402

local_ray_without_auth()

EXTRAPOLATE = (64, 512)


class SleepActor(ShardActor):
    """A shard worker whose compute is a fixed wait; it answers zeros of the points' shape."""

    def __init__(self, spec, rank: int, start: int, stop: int, rows=None) -> None:
        self._lock, self._line = threading.Lock(), None  # what ShardActor.listen uses
        self.sleep_s = spec.data_term.sleep_s
        self.rows = stop - start
        self._zeros: dict = {}

    def evaluate(self, points: np.ndarray, step: int, with_logp: bool = True):
        t0 = time.perf_counter()
        time.sleep(self.sleep_s)
        shape = points.shape
        if shape not in self._zeros:
            self._zeros[shape] = (np.zeros(shape[0]), np.zeros(shape))
        logp, grad = self._zeros[shape]
        return logp, grad, time.perf_counter() - t0

    def n_rows(self) -> int:
        return self.rows


def sleep_spec(sleep_s: float, d: int) -> WorkerSpec:
    """A spec whose data term is only what ``RayBackend.start`` reads (``z.type.shape``)."""
    term = types.SimpleNamespace(z=types.SimpleNamespace(type=types.SimpleNamespace(shape=(d,))),
                                 sleep_s=sleep_s)
    return WorkerSpec(data_term=term, source=None, seed=0, batch_size=None, n_points=1)


def time_steps(evaluate, compute_s, d: int, warm: int, steps: int) -> dict:
    """Medians over ``steps`` steps of wall, driver CPU, and wall minus the fixed wait (ms)."""
    points = np.zeros((1, d))
    for s in range(warm):
        evaluate(points, s)
    wall, cpu, over = [], [], []
    for s in range(warm, warm + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate(points, s)
        t1, c1 = time.perf_counter(), time.process_time()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
        over.append(t1 - t0 - compute_s())
    med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {"step_ms": med(wall), "overhead_ms": med(over), "driver_cpu_ms": med(cpu),
            "mean_driver_cpu_ms": 1e3 * statistics.fmean(cpu)}


def fit_line(ns: list[int], ys: list[float]) -> dict:
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(ys, float), 1)
    return {"a_ms": float(a), "b_ms_per_worker": float(b),
            **{f"at_{n}_ms": float(a + b * n) for n in EXTRAPOLATE}}


def run_n(n: int, args) -> dict:
    """Every series for ``n`` workers: flat plain, tree plain, tree compiled (one set of
    actors), then flat compiled (a second backend: its graph holds the actors)."""
    source = ArraySource({"x": np.zeros((n, 1))})
    out: dict = {}
    for path in args.paths:
        t0 = time.perf_counter()
        backend = RayBackend(sleep_spec(args.sleep_ms / 1e3, args.dims[0]), source, n,
                             num_cpus=0.01, path=path, actor_class=SleepActor, timeout_s=120).start()
        started = time.perf_counter() - t0
        try:
            for d in args.dims:
                out[(path, d)] = time_steps(backend.evaluate, lambda: backend.last_compute_s,
                                            d, args.warm, args.steps)
            if path == "plain" and n > args.fan_out:
                for compiled in (False, True):
                    with TreeReducer(backend.actors, args.fan_out, compiled=compiled) as tree:
                        for d in args.dims:
                            out[("tree " + ("compiled" if compiled else "plain"), d)] = time_steps(
                                tree.evaluate, lambda: tree.last_compute_s, d, args.warm, args.steps)
        finally:
            backend.close()
        print(f"# {n} workers, {path}: started in {started:.1f} s", file=sys.stderr)
    if n <= args.fan_out:  # no reducer: the tree is the flat sum
        for path in set(args.paths) & {"plain", "compiled"}:
            for d in args.dims:
                out[("tree " + path, d)] = out[(path, d)]
    for (series, d), r in sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"#   D={d:>6} {series:<14} step {r['step_ms']:7.3f} ms, overhead "
              f"{r['overhead_ms']:7.3f} ms, driver CPU {r['driver_cpu_ms']:7.3f} ms", file=sys.stderr)
    return out


ALL_SERIES = ("plain", "compiled", "direct", "tree plain", "tree compiled")


def report(rows: dict, args) -> dict:
    ns = sorted(rows)
    fits = {}
    SERIES = [s for s in ALL_SERIES if all((s, d) in rows[n] for n in ns for d in args.dims)]
    for d in args.dims:
        print(f"\nD = {d:,} (one point a step, {args.sleep_ms:g} ms fixed wait per worker; "
              f"ms per step: overhead = wall - wait / driver CPU; tree fan-out {args.fan_out})\n")
        print("| workers | " + " | ".join(SERIES) + " |")
        print("|---:|" + "---:|" * len(SERIES))
        for n in ns:
            cells = [f"{rows[n][(s, d)]['overhead_ms']:.2f} / {rows[n][(s, d)]['driver_cpu_ms']:.2f}"
                     for s in SERIES]
            print(f"| {n} | " + " | ".join(cells) + " |")
        for s in SERIES:
            for metric in ("overhead_ms", "driver_cpu_ms"):
                fits[f"{s}, D={d}, {metric}"] = fit_line(ns, [rows[n][(s, d)][metric] for n in ns])
    print("\nfitted a + b N (ms), extrapolated:\n")
    print("| series | a | b per worker | at 64 | at 512 |\n|---|---:|---:|---:|---:|")
    for name, f in fits.items():
        print(f"| {name} | {f['a_ms']:.3f} | {f['b_ms_per_worker']:.4f} | "
              f"{f['at_64_ms']:.2f} | {f['at_512_ms']:.2f} |")
    # a tree's driver receives the top level's answers, not N: its CPU against that count
    # (flat plain calls and plain trees together), extrapolated with the tree's top level
    if not ("plain" in SERIES and "tree plain" in SERIES):
        return fits
    top = lambda n: len(tree_levels(n, args.fan_out)[-1]) if n > args.fan_out else n  # noqa: E731
    print(f"\ndriver CPU (plain calls) against the answers it receives, a + b K (ms); the tree "
          f"(fan-out {args.fan_out}) receives K = {top(64)} at 64 and {top(512)} at 512 workers "
          f"(depth {len(tree_levels(64, args.fan_out))} and {len(tree_levels(512, args.fan_out))}):\n")
    print("| D | a | b per answer | flat at 64 | flat at 512 | tree at 64 | tree at 512 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d in args.dims:
        ks = [n for n in ns] + [top(n) for n in ns if n > args.fan_out]
        ys = ([rows[n][("plain", d)]["driver_cpu_ms"] for n in ns]
              + [rows[n][("tree plain", d)]["driver_cpu_ms"] for n in ns if n > args.fan_out])
        b, a = np.polyfit(np.asarray(ks, float), np.asarray(ys, float), 1)
        fits[f"driver CPU per answer, D={d}"] = {
            "a_ms": float(a), "b_ms_per_answer": float(b),
            **{f"flat_at_{n}_ms": float(a + b * n) for n in EXTRAPOLATE},
            **{f"tree_at_{n}_ms": float(a + b * top(n)) for n in EXTRAPOLATE}}
        print(f"| {d:,} | {a:.3f} | {b:.4f} | {a + 64 * b:.2f} | {a + 512 * b:.2f} | "
              f"{a + b * top(64):.2f} | {a + b * top(512):.2f} |")
    return fits


def load_rows(path: Path) -> tuple[dict, dict]:
    """The rows and settings of a result JSON, keyed as :func:`run_n` keys them."""
    import json

    result = json.loads(Path(path).read_text())
    rows = {}
    for n, cells in result["rows"].items():
        rows[int(n)] = {}
        for key, r in cells.items():
            series, d = key.rsplit(", D=", 1)
            rows[int(n)][(series, int(d))] = r
    return rows, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="2,4,8,16,32")
    ap.add_argument("--dims", default="8,10000")
    ap.add_argument("--sleep-ms", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--fan-out", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="N = 2, 4, 16; 60 steps")
    ap.add_argument("--paths", default="plain,compiled,direct",
                    help="the backend's paths to time (the tree runs with plain)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", metavar="JSON", help="print the tables of an earlier result, run nothing")
    args = ap.parse_args()
    if args.table:
        rows, result = load_rows(Path(args.table))
        args.dims, args.fan_out, args.sleep_ms = result["dims"], result["fan_out"], result["sleep_ms"]
        report(rows, args)
        return
    if args.quick:
        args.workers, args.steps, args.warm, args.fan_out = "2,4,16", 60, 10, 4
    args.dims = [int(d) for d in args.dims.split(",")]
    args.paths = args.paths.split(",")
    workers = [int(n) for n in args.workers.split(",")]
    env = environment()
    ray = start_local_ray()
    t0 = time.perf_counter()
    try:
        rows = {n: run_n(n, args) for n in workers}
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    fits = report(rows, args)
    print(f"\n(whole run {wall:.0f} s)")
    write_result(Path(args.out or "benchmarks/results/driver.json"), {
        "benchmark": "driver_cost_per_step", "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick, "sleep_ms": args.sleep_ms, "steps": args.steps, "warm": args.warm,
        "fan_out": args.fan_out, "dims": args.dims, "num_cpus_per_worker": 0.01,
        "rows": {str(n): {f"{s}, D={d}": r for (s, d), r in rows[n].items()} for n in rows},
        "fits": fits, "wall_s": wall, "environment": env})


if __name__ == "__main__":
    main()
