"""Local variables against the same effect as a dense global, and against pm.fit.

A hierarchical regression ``y ~ N(a[g] + b x, 1)``, ``a ~ N(mu, tau)``, with ``--rows`` rows
(default 2,000,000) over 1k / 10k / 100k / 1M groups, 2 shards, ``--batch`` rows per shard
per step. For each number of groups, in a fresh subprocess each (so the peak RSS is that
run's):

- ``local``: ``local={"a": "g"}`` (the groups' factors on the workers);
- ``dense``: ``a`` as a global free variable, today's only other way (the driver draws the
  groups' point and the workers return its dense gradient);
- ``pm.fit``: PyMC's ADVI with ``pm.Minibatch`` of the same total rows per step (up to
  ``--pm-max-groups`` groups; not with ``--backend ray``).

``--backend ray`` runs the two fits on 2 Ray workers (a local instance per subprocess), where
the bytes a step sends are real traffic.

Each is timed over ``--steps`` steps after a warm-up fit (start-up and compilation left
out): ms per step, the bytes a step sends to and from a worker (the global point and the
answer: ``8 * (S * D_global + S + S * D_global)`` per worker), and the driver's peak RSS.

Usage
-----
    .venv/bin/python benchmarks/bench_locals.py --rows 2000000 --groups 1000,10000,100000,1000000
    .venv/bin/python benchmarks/bench_locals.py --backend ray --groups 1000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def data(rows: int, groups: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    g = np.concatenate([np.arange(groups), rng.integers(0, groups, rows - groups)])
    x = rng.normal(size=rows)
    a = 0.3 + 0.5 * rng.normal(size=groups)
    return {"g": g.astype(np.int64), "x": x, "y": a[g] + 0.7 * x + rng.normal(size=rows)}


def factory_for(groups: int):
    import pymc as pm

    def factory(d):
        with pm.Model() as m:
            mu = pm.Normal("mu", 0, 1)
            tau = pm.HalfNormal("tau", 1)
            b = pm.Normal("b", 0, 1)
            a = pm.Normal("a", mu, tau, shape=groups)
            pm.Normal("y", a[d["g"]] + b * d["x"], 1.0, observed=d["y"])
        return m

    return factory


def run_one(kind: str, rows: int, groups: int, batch: int, steps: int, backend: str = "local") -> dict:
    import distvi as dv

    d = data(rows, groups)
    if kind == "pm.fit":
        import pymc as pm

        total = 2 * batch
        g_mb, x_mb, y_mb = pm.Minibatch(d["g"], d["x"], d["y"], batch_size=total)
        with pm.Model():
            mu = pm.Normal("mu", 0, 1)
            tau = pm.HalfNormal("tau", 1)
            b = pm.Normal("b", 0, 1)
            a = pm.Normal("a", mu, tau, shape=groups)
            pm.Normal("y", a[g_mb] + b * x_mb, 1.0, observed=y_mb, total_size=rows)
            pm.fit(20, method="advi", progressbar=False, random_seed=1)
            t0 = time.perf_counter()
            pm.fit(steps, method="advi", progressbar=False, random_seed=1)
            per_step = (time.perf_counter() - t0) / steps
        d_global = groups + 3
    else:
        local = {"a": "g"} if kind == "local" else None
        inf = dv.ADVI(model=factory_for(groups), data=d, local=local, batch_size=batch,
                      num_workers=2, backend=backend, random_seed=1)
        with inf:
            inf.fit(20, progressbar=False)
            t0 = time.perf_counter()
            inf.refine(steps, progressbar=False)
            per_step = (time.perf_counter() - t0) / steps
        d_global = inf.approx.ndim
    per_worker = 8 * (d_global + 1 + d_global)  # the point out; the value and gradient back
    return {"kind": kind, "groups": groups, "backend": backend, "ms_per_step": 1e3 * per_step,
            "bytes_per_step_per_worker": per_worker,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--groups", default="1000,10000,100000,1000000")
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pm-max-groups", type=int, default=100_000)
    ap.add_argument("--backend", default="local", choices=("local", "ray"))
    ap.add_argument("--one", nargs=2)  # internal: kind groups (in a subprocess)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.rows, int(args.one[1]), args.batch, args.steps,
                                 args.backend)))
        return
    results = []
    for groups in (int(s) for s in args.groups.split(",")):
        for kind in ("local", "dense", "pm.fit"):
            if kind == "pm.fit" and (groups > args.pm_max_groups or args.backend == "ray"):
                continue
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(groups),
                                  "--rows", str(args.rows), "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--backend", args.backend],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    print("\n| groups | local ms/step | dense ms/step | pm.fit ms/step | dense / local | "
          "bytes/step/worker local | dense | RSS MB local | dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["kind"], r["groups"]): r for r in results}
    for groups in sorted({r["groups"] for r in results}):
        lo, de, pf = by.get(("local", groups)), by.get(("dense", groups)), by.get(("pm.fit", groups))

        def f(r, k, fmt="{:.2f}"):
            return fmt.format(r[k]) if r else "-"

        ratio = f"{de['ms_per_step'] / lo['ms_per_step']:.1f}x" if lo and de else "-"
        print(f"| {groups:,} | {f(lo, 'ms_per_step')} | {f(de, 'ms_per_step')} | "
              f"{f(pf, 'ms_per_step')} | {ratio} | {f(lo, 'bytes_per_step_per_worker', '{:,}')} | "
              f"{f(de, 'bytes_per_step_per_worker', '{:,}')} | {f(lo, 'driver_peak_rss_mb', '{:.0f}')} | "
              f"{f(de, 'driver_peak_rss_mb', '{:.0f}')} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
