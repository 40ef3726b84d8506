"""Benchmark: what recording a fit costs — a Zarr run store, and a run store plus MLflow.

The job is the core benchmark of ``bench_advi.py``: logistic regression, N=200,000 rows,
D=20 features, batch 1,000, mean-field ``dv.ADVI``, ``adam(learning_rate=0.01)``, 10,000
steps, ``random_seed=1``, local backend. Three configurations:

off
    ``inference.fit(n, ...)`` with nothing recorded.
store
    ``store=<tmp>/run-*.zarr`` with the default cadence (a checkpoint every 60 s and at the
    end; ``--checkpoint-every N`` for one every N steps): traces, checkpoints, and the posterior
    draws written at the end.
store+mlflow
    the same plus ``tracking=MLflowTracking(tracking_uri="sqlite:///<tmp>/mlflow.db",
    log_every=100)`` (defaults: at most one call every 5 s): the loss and window metrics from a background
    thread, then ``loss.png``, ``posterior_summary.csv`` and the store as artifacts.

What is timed
-------------
The wall time of the whole ``inference.fit(...)`` call (compilation, the loop, and
everything a recorded fit does at its end), on a fresh ``dv.ADVI`` each time. Before the
timed runs, one short throwaway fit per configuration warms PyTensor's compile cache, the
imports (zarr, mlflow, arviz, matplotlib) and the SQLite database, so the first timed run
does not pay them; their times are reported as ``warmup_s``. The configurations are
interleaved, and their order is rotated from one repeat to the next, because the machine
is shared and noisy. Medians over ``--repeats``; overhead = (median on - median off) /
median off.

For the recorded runs the wall time is also split into the loop (the sum of the
``step_seconds`` trace in the store, checkpoint and MLflow batching included) and the rest
(setup, compilation, and the end of the run: posterior draws, artifacts).

No timing is asserted: this is a measurement script.

Usage
-----
    .venv/bin/python benchmarks/bench_recording.py            # full run (a few minutes)
    .venv/bin/python benchmarks/bench_recording.py --quick    # 1,000 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (D, FIT_SEED, LEARNING_RATE, RESULTS, distvi_factory,  # noqa: E402
                     environment, fmt, make_data, median, quiet_logs, write_result)

CONFIGS = ("off", "store", "store+mlflow")
CHECKPOINT_EVERY = None  # the default: a checkpoint every 60 s of wall time (and at the end)
LOG_EVERY = 100
WARMUP_STEPS = 200
TARGET_PCT = 5.0
DEFAULT_OUT = RESULTS / "recording.json"


class Bench:
    """The data, a scratch directory for stores and the MLflow database, and one timed fit."""

    def __init__(self, X: np.ndarray, y: np.ndarray, batch: int, workdir: Path) -> None:
        self.data = {"X": X, "y": y}
        self.batch = batch
        self.workdir = workdir
        self.db_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts = (workdir / "mlartifacts").as_uri()
        self.count = 0
        self.checkpoint_every = CHECKPOINT_EVERY

    def run(self, config: str, n: int) -> dict[str, Any]:
        import distvi as dv

        self.count += 1
        store = self.workdir / f"run-{self.count}.zarr"
        kwargs: dict[str, Any] = {}
        tracker = None
        if config in ("store", "store+mlflow"):
            kwargs.update(store=str(store), checkpoint_every=self.checkpoint_every)
        if config == "store+mlflow":
            tracker = dv.MLflowTracking(experiment="bench_recording", tracking_uri=self.db_uri,
                                        log_every=LOG_EVERY, artifact_location=self.artifacts)
            kwargs["tracking"] = tracker
        inference = dv.ADVI(model=distvi_factory, data=self.data, batch_size=self.batch,
                            random_seed=FIT_SEED)
        gc.collect()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            inference.fit(n, obj_optimizer=dv.adam(learning_rate=LEARNING_RATE), progressbar=False,
                          **kwargs)
            wall = time.perf_counter() - t0
        out: dict[str, Any] = {"config": config, "wall_s": wall, "hist": np.asarray(inference.hist)}
        if config != "off":
            run = dv.open_run(str(store))
            loop = float(np.sum(run.traces["step_seconds"]))
            out.update(loop_s=loop, outside_loop_s=wall - loop, store_status=run.status,
                       store_mb=_size_mb(store))
            shutil.rmtree(store, ignore_errors=True)
        if tracker is not None:
            out.update(mlflow_warned=tracker.warned, mlflow_run_id=tracker.run_id)
        out["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught
                                  if "BLAS" not in str(w.message)})
        inference.close()
        return out


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def pct(on: float | None, off: float | None) -> float | None:
    return None if on is None or not off else 100.0 * (on - off) / off


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="steps per fit (default 10000)")
    ap.add_argument("--rows", type=int, default=200000, help="rows N (default 200000)")
    ap.add_argument("--batch", type=int, default=1000, help="minibatch size (default 1000)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: n=1000, repeats=1")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (MLflow db)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="steps between checkpoints (default: distvi's, every 60 s and at the end)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats = 1000, 1
    for name in ("n", "rows", "batch", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")

    import mlflow
    import zarr

    quiet_logs("mlflow")  # after importing mlflow, which sets its logger to INFO

    env = environment()
    env.update(mlflow=mlflow.__version__, zarr=zarr.__version__)
    X, y, _ = make_data(args.rows)
    workdir = Path(tempfile.mkdtemp(prefix="distvi-bench-recording-"))
    bench = Bench(X, y, args.batch, workdir)
    bench.checkpoint_every = args.checkpoint_every
    runs: list[dict[str, Any]] = []
    warmup: dict[str, float] = {}
    try:
        # throwaway fits: the compile cache, the imports, the SQLite database
        for config in CONFIGS:
            warmup[config] = bench.run(config, WARMUP_STEPS)["wall_s"]
        print("# warm-up (" + ", ".join(f"{c} {s:.2f} s" for c, s in warmup.items())
              + f"; {WARMUP_STEPS} steps each)", flush=True)

        for r in range(args.repeats):
            order = CONFIGS[r % 3:] + CONFIGS[:r % 3]
            ref_hist = None
            for config in order:
                res = bench.run(config, args.n)
                res["repeat"] = r
                hist = res.pop("hist")
                if config == "off":
                    ref_hist = hist
                res["_hist"] = hist
                runs.append(res)
                extra = ""
                if "loop_s" in res:
                    extra = f" (loop {res['loop_s']:.2f} s + outside {res['outside_loop_s']:.2f} s)"
                print(f"# repeat {r + 1}/{args.repeats}: {config:<12} {res['wall_s']:.2f} s{extra}",
                      flush=True)
            for res in runs:
                if res["repeat"] == r:
                    hist = res.pop("_hist")
                    res["hist_equals_off"] = bool(ref_hist is not None and np.array_equal(hist, ref_hist))
    finally:
        if args.keep:
            print(f"# scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, dict[str, Any]] = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        summary[config] = {"wall_s_median": median([r["wall_s"] for r in mine]),
                           "wall_s": [r["wall_s"] for r in mine],
                           "loop_s_median": median([r.get("loop_s") for r in mine]),
                           "outside_loop_s_median": median([r.get("outside_loop_s") for r in mine])}
    off = summary["off"]["wall_s_median"]
    for config in CONFIGS[1:]:
        s = summary[config]
        s["overhead_pct"] = pct(s["wall_s_median"], off)
        paired = []
        for r in range(args.repeats):
            a = [x["wall_s"] for x in runs if x["repeat"] == r and x["config"] == config]
            b = [x["wall_s"] for x in runs if x["repeat"] == r and x["config"] == "off"]
            if a and b:
                paired.append(pct(a[0], b[0]))
        s["overhead_pct_per_repeat"] = paired
        s["meets_target"] = s["overhead_pct"] is not None and s["overhead_pct"] <= TARGET_PCT
    all_equal = all(r.get("hist_equals_off", False) for r in runs)
    problems = [r for r in runs if r.get("mlflow_warned") or r.get("store_status", "finished") != "finished"]

    lines = [
        "",
        f"## Recording overhead: ADVI logistic regression, N={args.rows:,}, D={D}, batch={args.batch:,}, "
        f"n={args.n:,}, adam({LEARNING_RATE}), local backend, repeats={args.repeats}"
        + (" (--quick)" if args.quick else ""),
        "",
        "| configuration | wall s (median) | overhead vs off | per repeat | loop s | outside loop s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for config in CONFIGS:
        s = summary[config]
        over = "—" if config == "off" else f"{fmt(s['overhead_pct'], '+.1f')} %"
        per = ", ".join(f"{w:.2f}" for w in s["wall_s"])
        if config != "off":
            per += " (" + ", ".join(f"{fmt(p, '+.1f')} %" for p in s["overhead_pct_per_repeat"]) + ")"
        lines.append(f"| {config} | {fmt(s['wall_s_median'], '.2f')} | {over} | {per} "
                     f"| {fmt(s['loop_s_median'], '.2f')} | {fmt(s['outside_loop_s_median'], '.2f')} |")
    lines += [
        "",
        f"issue target: overhead <= {TARGET_PCT:.0f} % of wall time: store "
        f"{'met' if summary['store']['meets_target'] else 'NOT met'}, store+mlflow "
        f"{'met' if summary['store+mlflow']['meets_target'] else 'NOT met'}",
        f"loss history identical to the unrecorded fit in every run: {all_equal}",
        f"store: checkpoint_every={bench.checkpoint_every}; mlflow: SQLite, log_every={LOG_EVERY}",
        "warm-up fits (first use of each configuration in this process, "
        f"{WARMUP_STEPS} steps): " + ", ".join(f"{c} {s:.2f} s" for c, s in warmup.items()),
        "wall: the whole inference.fit() call on a fresh dv.ADVI (compile from PyTensor's cache "
        "included); loop: sum of the store's step_seconds trace",
        "",
        f"date: {env['date']}",
        f"cpu: {env['cpu_model']} ({env['machine']}), os.cpu_count()={env['cpu_count']}, "
        f"loadavg at start={env['loadavg_at_start']}",
        f"versions: python {env['python']}, distvi {env['distvi']}, pymc {env['pymc']}, "
        f"pytensor {env['pytensor']}, numpy {env['numpy']}, mlflow {env['mlflow']}, zarr {env['zarr']}",
    ]
    if problems:
        lines.append(f"PROBLEMS: {len(problems)} run(s) warned or did not finish: "
                     + "; ".join(f"{p['config']} repeat {p['repeat'] + 1}: {p['warnings']}" for p in problems))
    print("\n".join(lines), flush=True)

    result = {
        "benchmark": "recording_overhead",
        "config": {"rows": args.rows, "d": D, "batch": args.batch, "n": args.n, "repeats": args.repeats,
                   "quick": args.quick, "method": "ADVI", "backend": "local",
                   "optimizer": f"adam(learning_rate={LEARNING_RATE})", "random_seed": FIT_SEED,
                   "checkpoint_every": bench.checkpoint_every, "log_every": LOG_EVERY,
                   "tracking_uri": "sqlite (temporary directory)", "warmup_steps": WARMUP_STEPS},
        "environment": env,
        "warmup_s": warmup,
        "summary": summary,
        "target_overhead_pct": TARGET_PCT,
        "hist_identical_across_configs": all_equal,
        "runs": runs,
        "notes": {
            "wall": "whole inference.fit() call on a fresh dv.ADVI; compile cache, imports and the "
                    "SQLite database warmed by one short fit per configuration first",
            "overhead_pct": "(median wall on - median wall off) / median wall off * 100",
            "overhead_pct_per_repeat": "the same within each repeat (paired)",
            "loop_s": "sum of the store's step_seconds trace (checkpoints and MLflow batching included)",
            "outside_loop_s": "wall - loop: setup, compile, posterior draws, store flush, MLflow artifacts",
            "order": "configurations interleaved, order rotated by one each repeat",
        },
    }
    write_result(args.out, result)
    return 1 if problems or not all_equal else 0


if __name__ == "__main__":
    sys.exit(main())
