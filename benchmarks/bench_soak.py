"""Soak benchmark: one long recorded fit, watched for leaks and checked for a complete record.

The job: logistic regression with an intercept on N=20,000 rows x D=5 features (generated
with a fixed numpy seed), mean-field ``dv.ADVI``, ``adam(learning_rate=0.01)``, minibatch 100,
``random_seed=1``, ``--n`` steps (default 200,000), progress bar off, with everything a
production run records switched on:

- a Zarr run store in a temporary directory, with a checkpoint every ``--checkpoint-every``
  steps (default 5,000) on top of distvi's default cadence (every 60 s and at the end);
- MLflow tracking to a SQLite database in the same directory
  (``dv.MLflowTracking(tracking_uri="sqlite:///<tmp>/mlflow.db", log_every=100)``).

What is measured
----------------
A callback (``cb(approx, losses, step)``, called after every step) samples the driver process
every ``--sample-every`` steps (default 2,000): its RSS (``/proc/self/statm`` resident pages x
page size), its open file descriptors (``len(os.listdir("/proc/self/fd"))``) and its thread
count (``threading.active_count()`` and the kernel's ``Threads:`` from ``/proc/self/status``).
One sample is also taken before the fit and one after it (after ``inference.close()``).

From the samples after the warm-up (the first 10 % of the steps) the slopes are fitted by
least squares, in MB / fds / threads per 100,000 steps.

Memory that grows with ``n`` by design: distvi's loop keeps four float64 values per step (loss,
gradient norm, step seconds, learning rate) in arrays of length ``n`` allocated at the start
and touched page by page as the loop fills them: 32 bytes per step, 3.05 MB per 100k steps
(an unrecorded 200,000-step fit of this job measured 3.06 MB per 100k). The **net** RSS slope
is the raw slope minus that. The run is called **flat** when

    |net RSS slope| < 5 MB per 100k steps; and, for the open fds and for the kernel's thread
    count, |slope| < 0.5 per 100k steps (less than one per 200k steps) and the last count
    equals the count at the end of the warm-up.

(A single fd may be open for the length of a write by the MLflow thread when a sample is
taken: a transient, not a leak; the fd criteria allow it.) The raw slope, the largest rise
between two consecutive samples, the thread names before and after the fit, and which threads
started or ended between samples are reported as well.

it/s is ``n`` over the loop's time (the sum of the store's ``step_seconds`` trace: the steps,
the checkpoints, the MLflow batching and the callback); the whole ``fit`` call's wall time is
reported beside it. The callback's timestamps give the rate after the warm-up (the loop's
first step, ~0.6 s here, and the first steps' one-off costs excluded) and the rate of the
first and the last sampling window, which shows whether the steps slowed down over the run.

What is checked after the fit (each pass/fail, with counts)
-----------------------------------------------------------
- the store: status ``"finished"``; ``run.traces["step"]`` equals ``numpy.arange(1, n + 1)``
  exactly (no duplicated or missing step); the loss trace has ``n`` finite values; the last
  checkpoint is at step ``n``;
- MLflow: the run named by the store's ``mlflow_run_id`` attribute has status ``FINISHED``;
  its ``loss`` history has exactly ``n / log_every`` points at the unique steps
  ``log_every, 2 log_every, ..., n``, and each equals the store's loss at that step;
- the flat criterion above.

The exit code is 1 when any check fails (0 otherwise); the JSON is written either way.

Usage
-----
    .venv/bin/python benchmarks/bench_soak.py --quick              # n=20,000 (~30 s; too short
                                                                   # for the flat verdict: one-off
                                                                   # MB become a steep slope)
    .venv/bin/python benchmarks/bench_soak.py                      # n=200,000, local (~1 min)
    .venv/bin/python benchmarks/bench_soak.py --backend ray --json benchmarks/results/soak_ray.json
                                                                   # 2 Ray workers (~13 min);
                                                                   # distvi starts a local Ray
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, environment, fmt, local_ray_without_auth, quiet_logs,  # noqa: E402
                     write_result)

ROWS = 20_000
D = 5
DATA_SEED = 20261127
FIT_SEED = 1
LEARNING_RATE = 0.01
BATCH = 100
LOG_EVERY = 100
WARMUP_FRACTION = 0.10
RSS_LIMIT_MB_PER_100K = 5.0
COUNT_LIMIT_PER_100K = 0.5  # fds, threads
TRACE_BYTES_PER_STEP = 4 * 8  # loss, grad norm, step seconds, learning rate: float64 arrays of n
TRACE_MB_PER_100K = TRACE_BYTES_PER_STEP * 100_000 / 2**20
PER = 100_000  # slopes are per this many steps
DEFAULT_OUT = RESULTS / "soak.json"


# ---------------------------------------------------------------------------- data & model
def make_data(rows: int = ROWS, d: int = D, seed: int = DATA_SEED) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """X ~ N(0, 1) (rows x d), w ~ N(0, 0.5), intercept -0.3, y ~ Bernoulli(sigmoid(b + X w))."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, size=(rows, d))
    w_true = rng.normal(0.0, 0.5, size=d)
    truth = np.concatenate([[-0.3], w_true])
    p = 1.0 / (1.0 + np.exp(-(truth[0] + X @ w_true)))
    y = rng.binomial(1, p).astype(np.int64)
    return {"X": X, "y": y}, truth


def soak_factory(data):
    """Logistic regression with an intercept; ``data`` holds the minibatch's rows."""
    import pymc as pm

    d = data["X"].type.shape[1]
    with pm.Model() as m:
        b = pm.Normal("b", 0.0, 2.0)
        w = pm.Normal("w", 0.0, 1.0, shape=d)
        pm.Bernoulli("y", logit_p=b + data["X"] @ w, observed=data["y"])
    return m


# ---------------------------------------------------------------------------- sampling
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def process_sample(step: int) -> dict[str, Any]:
    """RSS (MB), open fds, Python threads and the kernel's thread count of this process."""
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1])
    os_threads = None
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                os_threads = int(line.split()[1])
                break
    return {"step": int(step), "t": time.perf_counter(), "rss_mb": resident * PAGE_MB,
            "fds": len(os.listdir("/proc/self/fd")), "threads_py": threading.active_count(),
            "threads_os": os_threads}


def thread_names() -> tuple[list[str], list[str]]:
    """The Python threads' names and the kernel's names (``/proc/self/task/*/comm``) of this
    process's threads (Python 3.11 does not name its threads in the kernel: "python")."""
    kernel = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                kernel.append(fh.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(t.name for t in threading.enumerate()), sorted(kernel)


def _diff(old: list[str], new: list[str]) -> list[str]:
    """Names started (+) and ended (-) between two lists of names (multisets)."""
    a, b = Counter(old), Counter(new)
    return [f"+{k}" for k in sorted((b - a).elements())] + [f"-{k}" for k in sorted((a - b).elements())]


class Sampler:
    """A fit callback: one :func:`process_sample` every ``every`` steps, and which threads
    started or ended since the previous sample (Python names, and the kernel's names)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[dict[str, Any]] = []
        self.names = thread_names()

    def __call__(self, approx, losses, step: int) -> None:
        if step % self.every == 0:
            sample = process_sample(step)
            names = thread_names()
            if names != self.names:
                sample["threads_changed_py"] = _diff(self.names[0], names[0])
                sample["threads_changed_os"] = _diff(self.names[1], names[1])
                self.names = names
            self.samples.append(sample)


def slope_per(samples: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of ``key`` against step, per ``PER`` steps (None: < 2 samples)."""
    if len(samples) < 2:
        return None
    x = np.array([s["step"] for s in samples], dtype=np.float64)
    y = np.array([s[key] for s in samples], dtype=np.float64)
    x = x - x.mean()
    return float((x @ (y - y.mean())) / (x @ x) * PER)


# ---------------------------------------------------------------------------- checks
def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "pass": bool(ok), "detail": detail}


def check_store(store: Path, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trace, loss, status and last checkpoint of the run store; also returns what the
    MLflow checks need (the run id, the loss trace)."""
    import zarr

    import distvi as dv

    out = []
    run = dv.open_run(str(store))
    steps = np.asarray(run.traces["step"])
    expected = np.arange(1, n + 1)
    uniq = np.unique(steps)
    dup = int(steps.size - uniq.size)
    missing = int(np.setdiff1d(expected, uniq).size)
    extra = int(np.setdiff1d(uniq, expected).size)
    exact = steps.shape == expected.shape and bool(np.array_equal(steps, expected))
    detail = f"{steps.size:,} rows (expected {n:,}); duplicated {dup}, missing {missing}, unexpected {extra}"
    if not exact and not (dup or missing or extra):
        detail += "; same set but out of order"
    out.append(check("store step trace == arange(1, n+1)", exact, detail))
    loss = np.asarray(run.traces["loss"], dtype=np.float64)
    finite = int(np.isfinite(loss).sum())
    out.append(check("store loss trace: n finite values", loss.size == n and finite == n,
                     f"{loss.size:,} values, {finite:,} finite (expected {n:,})"))
    out.append(check("store status == finished", run.status == "finished", f"status {run.status!r}"))
    ck = None if run.checkpoint is None else run.checkpoint.step
    out.append(check("store last checkpoint at step n", ck == n, f"last checkpoint step {ck}"))
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    return out, {"run_id": attrs.get("mlflow_run_id"), "steps": steps, "loss": loss,
                 "loop_s": float(np.sum(run.traces["step_seconds"]))}


def check_mlflow(tracking_uri: str, run_id: str | None, n: int, store_steps: np.ndarray,
                 store_loss: np.ndarray) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    if not run_id:
        return [check("mlflow run id in the store's attributes", False, "no 'mlflow_run_id' attribute")]
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    out = [check("mlflow run status == FINISHED", run.info.status == "FINISHED",
                 f"run {run_id}: status {run.info.status}")]
    hist = client.get_metric_history(run_id, "loss")
    steps = np.array(sorted(m.step for m in hist), dtype=np.int64)
    expected = np.arange(LOG_EVERY, n + 1, LOG_EVERY)
    uniq = np.unique(steps)
    dup = int(steps.size - uniq.size)
    missing = int(np.setdiff1d(expected, uniq).size)
    extra = int(np.setdiff1d(uniq, expected).size)
    ok = n % LOG_EVERY == 0 and steps.size == expected.size and np.array_equal(steps, expected)
    out.append(check(f"mlflow loss history: n/log_every points at steps {LOG_EVERY}, {2 * LOG_EVERY}, ..., n",
                     ok, f"{steps.size:,} points (expected {expected.size:,}); duplicated {dup}, "
                         f"missing {missing}, unexpected {extra}"))
    # each logged point is the loss of that step, as the store recorded it
    by_step = dict(zip(store_steps.tolist(), store_loss.tolist()))
    mismatched = sum(1 for m in hist if m.step not in by_step or
                     not np.isclose(m.value, by_step[m.step], rtol=1e-12, atol=0.0))
    out.append(check("mlflow loss == store loss at each logged step", mismatched == 0 and len(hist) > 0,
                     f"{len(hist) - mismatched:,} of {len(hist):,} points equal"))
    return out


# ---------------------------------------------------------------------------- the run
def soak(n: int, backend: str, workdir: Path, checkpoint_every: int, sample_every: int) -> dict[str, Any]:
    import distvi as dv

    data, truth = make_data()
    store = workdir / "soak.zarr"
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker = dv.MLflowTracking(experiment="bench_soak", tracking_uri=tracking_uri, log_every=LOG_EVERY,
                                artifact_location=(workdir / "mlartifacts").as_uri())
    sampler = Sampler(sample_every)
    options: dict[str, Any] = {}
    if backend == "ray":
        options = {"num_workers": 2, "backend": "ray"}
    gc.collect()
    before = process_sample(0)
    before["thread_names"], before["thread_names_os"] = thread_names()
    error, inference, mean = None, None, None
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            inference = dv.ADVI(model=soak_factory, data=data, batch_size=BATCH, random_seed=FIT_SEED,
                                **options)
            inference.fit(n, obj_optimizer=dv.adam(learning_rate=LEARNING_RATE), progressbar=False,
                          callbacks=[sampler], store=str(store), checkpoint_every=checkpoint_every,
                          tracking=tracker)
        except Exception:
            error = traceback.format_exc()
            print(f"\n# the fit FAILED:\n{error}", file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
        if inference is not None:
            mean = np.asarray(inference.approx.mean).ravel().tolist()
            inference.close()
    gc.collect()
    after = process_sample(n)
    after["thread_names"], after["thread_names_os"] = thread_names()
    return {"samples": sampler.samples, "before": before, "after": after, "fit_wall_s": wall,
            "error": error, "store": store, "tracking_uri": tracking_uri, "mean": mean,
            "truth": truth.tolist(), "mlflow_warned": tracker.warned,
            "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught
                                if "BLAS" not in str(w.message)})}


def analyse(samples: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Slopes after the warm-up, first/last/max, and the flat verdict."""
    warm_end = int(np.ceil(WARMUP_FRACTION * n))
    after = [s for s in samples if s["step"] >= warm_end]
    out: dict[str, Any] = {"warmup_end_step": warm_end, "samples_total": len(samples),
                           "samples_after_warmup": len(after)}
    for key in ("rss_mb", "fds", "threads_py", "threads_os"):
        vals = [s[key] for s in samples]
        out[key] = {"first": vals[0] if vals else None, "at_warmup_end": after[0][key] if after else None,
                    "last": vals[-1] if vals else None, "max": max(vals) if vals else None,
                    "min": min(vals) if vals else None, "slope_per_100k": slope_per(after, key)}
    rss, fds, thr = out["rss_mb"], out["fds"], out["threads_os"]
    rises = [b["rss_mb"] - a["rss_mb"] for a, b in zip(after, after[1:])]
    rss["largest_rise_between_samples"] = max(rises) if rises else None
    rss["net_slope_per_100k"] = (None if rss["slope_per_100k"] is None
                                 else rss["slope_per_100k"] - TRACE_MB_PER_100K)
    reasons = []
    if rss["slope_per_100k"] is None:
        reasons.append("fewer than 2 samples after the warm-up")
    else:
        if abs(rss["net_slope_per_100k"]) >= RSS_LIMIT_MB_PER_100K:
            reasons.append(f"net RSS slope {rss['net_slope_per_100k']:+.2f} MB/100k")
        for name, v in (("fd", fds), ("thread", thr)):
            if abs(v["slope_per_100k"]) >= COUNT_LIMIT_PER_100K:
                reasons.append(f"{name} slope {v['slope_per_100k']:+.3f}/100k")
            if v["last"] != v["at_warmup_end"]:
                reasons.append(f"last {name}s {v['last']} != {v['at_warmup_end']} at the warm-up end")
    out["flat"] = not reasons
    out["not_flat_because"] = reasons
    # rates from the callback's timestamps: after the warm-up, and the first and last windows
    if len(after) >= 2:
        out["it_per_s_after_warmup"] = (after[-1]["step"] - after[0]["step"]) / (after[-1]["t"] - after[0]["t"])
    if len(samples) >= 2:
        a, b = samples[0], samples[1]
        y, z = samples[-2], samples[-1]
        out["it_per_s_first_window"] = (b["step"] - a["step"]) / (b["t"] - a["t"])
        out["it_per_s_last_window"] = (z["step"] - y["step"]) / (z["t"] - y["t"])
    return out


def fmt_vec(v: list[float] | None) -> str:
    return "n/a" if v is None else "[" + ", ".join(f"{x:.3f}" for x in v) + "]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="steps (default 200000)")
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="local (1 shard, in process) or ray (2 workers; distvi starts a local Ray)")
    ap.add_argument("--checkpoint-every", type=int, default=5_000, help="steps between checkpoints (default 5000)")
    ap.add_argument("--sample-every", type=int, default=2_000, help="steps between samples (default 2000)")
    ap.add_argument("--quick", action="store_true", help="n=20000")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (store, MLflow db)")
    ap.add_argument("--json", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 20_000
    for name in ("n", "checkpoint_every", "sample_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n % LOG_EVERY:
        ap.error(f"--n must be a multiple of log_every={LOG_EVERY}")
    if args.backend == "ray":
        local_ray_without_auth()  # distvi starts a throwaway local instance

    import mlflow
    import zarr

    quiet_logs("mlflow", "alembic")  # after importing mlflow, which sets its logger to INFO

    env = environment()
    env.update(mlflow=mlflow.__version__, zarr=zarr.__version__)
    workdir = Path(tempfile.mkdtemp(prefix="distvi-bench-soak-"))
    print(f"# soak: n={args.n:,}, backend={args.backend}, scratch {workdir}", flush=True)
    checks: list[dict[str, Any]] = []
    store_info: dict[str, Any] = {}
    t_start = time.perf_counter()
    try:
        res = soak(args.n, args.backend, workdir, args.checkpoint_every, args.sample_every)
        if res["error"] is not None:
            checks.append(check("fit completed", False, res["error"].strip().splitlines()[-1]))
        try:
            store_checks, store_info = check_store(res["store"], args.n)
            checks += store_checks
            checks += check_mlflow(res["tracking_uri"], store_info["run_id"], args.n,
                                   store_info["steps"], store_info["loss"])
            loop_s = store_info["loop_s"]
            store_mb = sum(f.stat().st_size for f in res["store"].rglob("*") if f.is_file()) / 2**20
            n_ckpt_dirs = len(list((res["store"] / "checkpoints").glob("*/zarr.json"))) \
                if (res["store"] / "checkpoints").exists() else None
        except Exception:
            tb = traceback.format_exc()
            print(f"\n# the checks FAILED:\n{tb}", file=sys.stderr, flush=True)
            checks.append(check("checks ran", False, tb.strip().splitlines()[-1]))
            loop_s, store_mb, n_ckpt_dirs = None, None, None
    finally:
        if args.keep:
            print(f"# scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total_wall = time.perf_counter() - t_start

    stats = analyse(res["samples"], args.n)
    checks.append(check("flat: |net RSS slope| < 5 MB/100k; fds, threads: |slope| < 0.5/100k, last == at warm-up end",
                        stats["flat"], "; ".join(stats["not_flat_because"]) or
                        f"net RSS {fmt(stats['rss_mb']['net_slope_per_100k'], '+.2f')} MB/100k, "
                        f"fds {fmt(stats['fds']['slope_per_100k'], '+.3f')}/100k, "
                        f"threads {fmt(stats['threads_os']['slope_per_100k'], '+.3f')}/100k"))
    it_s = args.n / loop_s if loop_s else None
    failed = [c for c in checks if not c["pass"]]

    rows = [("RSS MB", "rss_mb", ".1f", "+.2f"), ("open fds", "fds", "d", "+.3f"),
            ("threads (Python)", "threads_py", "d", "+.3f"), ("threads (kernel)", "threads_os", "d", "+.3f")]
    b, a = res["before"], res["after"]
    lines = [
        "",
        f"## Soak: ADVI logistic regression, N={ROWS:,}, D={D}+intercept, batch={BATCH}, n={args.n:,}, "
        f"adam({LEARNING_RATE}), backend={args.backend}" + (", 2 workers" if args.backend == "ray" else "")
        + (" (--quick)" if args.quick else ""),
        "",
        f"store: checkpoint_every={args.checkpoint_every:,} (+ every 60 s and at the end); "
        f"MLflow: SQLite, log_every={LOG_EVERY}; samples every {args.sample_every:,} steps, "
        f"warm-up = first {stats['warmup_end_step']:,} steps",
        f"wall: fit {res['fit_wall_s']:.1f} s, whole script {total_wall:.1f} s; loop {fmt(loop_s, '.1f')} s "
        f"-> **{fmt(it_s, ',.0f')} it/s**; after the warm-up "
        f"{fmt(stats.get('it_per_s_after_warmup'), ',.0f')} it/s; first / last sampling window "
        f"{fmt(stats.get('it_per_s_first_window'), ',.0f')} / {fmt(stats.get('it_per_s_last_window'), ',.0f')} it/s",
        "",
        "| measure | before fit | first | at warm-up end | last | max | after close | slope per 100k steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, key, spec, sspec in rows:
        s = stats[key]
        lines.append(f"| {label} | {fmt(b[key], spec)} | {fmt(s['first'], spec)} | {fmt(s['at_warmup_end'], spec)} "
                     f"| {fmt(s['last'], spec)} | {fmt(s['max'], spec)} | {fmt(a[key], spec)} "
                     f"| {fmt(s['slope_per_100k'], sspec)} |")
    r = stats["rss_mb"]
    lines += [
        "",
        f"RSS slope {fmt(r['slope_per_100k'], '+.2f')} MB/100k raw, {fmt(r['net_slope_per_100k'], '+.2f')} net of "
        f"the loop's trace arrays ({TRACE_MB_PER_100K:.2f} MB/100k); largest rise between two samples "
        f"{fmt(r['largest_rise_between_samples'], '.1f')} MB; slopes over the samples from step "
        f"{stats['warmup_end_step']:,} ({stats['samples_after_warmup']} of {stats['samples_total']})",
        f"Python threads before the fit: {', '.join(b['thread_names'])}; after close: {', '.join(a['thread_names'])}",
    ]
    changes = [f"step {x['step']:,}: {' '.join(x['threads_changed_py']) or '(none)'} "
               f"[kernel: {' '.join(x['threads_changed_os']) or '(none)'}]"
               for x in res["samples"][1:] if "threads_changed_py" in x]
    lines.append("thread changes between samples after the first: " + ("; ".join(changes) or "none"))
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['pass'] else '**FAIL**'} | {c['detail']} |" for c in checks]
    lines += [
        "",
        f"store on disk at the end: {fmt(store_mb, '.2f')} MB, checkpoint groups left: {n_ckpt_dirs}; "
        f"posterior mean (b, w) {fmt_vec(res['mean'])}, truth {fmt_vec(res['truth'])}",
        f"MLflow warned: {res['mlflow_warned']}; warnings: {res['warnings'] or 'none'}",
        f"date: {env['date']}; cpu: {env['cpu_model']} ({env['machine']}), os.cpu_count()={env['cpu_count']}, "
        f"loadavg at start={env['loadavg_at_start']}",
        f"versions: python {env['python']}, distvi {env['distvi']}, pymc {env['pymc']}, "
        f"pytensor {env['pytensor']}, numpy {env['numpy']}, mlflow {env['mlflow']}, zarr {env['zarr']}",
        f"RESULT: {len(checks) - len(failed)} of {len(checks)} checks pass"
        + (f"; FAILED: {', '.join(c['check'] for c in failed)}" if failed else ""),
    ]
    print("\n".join(lines), flush=True)

    result = {
        "benchmark": "soak",
        "config": {"rows": ROWS, "d": D, "intercept": True, "batch": BATCH, "n": args.n, "quick": args.quick,
                   "method": "ADVI", "backend": args.backend, "num_workers": 2 if args.backend == "ray" else 1,
                   "optimizer": f"adam(learning_rate={LEARNING_RATE})", "random_seed": FIT_SEED,
                   "data_seed": DATA_SEED, "checkpoint_every": args.checkpoint_every, "log_every": LOG_EVERY,
                   "sample_every": args.sample_every, "warmup_fraction": WARMUP_FRACTION,
                   "tracking_uri": "sqlite (temporary directory)"},
        "environment": env,
        "fit_wall_s": res["fit_wall_s"],
        "script_wall_s": total_wall,
        "loop_s": loop_s,
        "it_per_s": it_s,
        "stats": stats,
        "flat_criterion": f"|net RSS slope| < {RSS_LIMIT_MB_PER_100K} MB per 100k steps (net: minus "
                          f"{TRACE_MB_PER_100K:.2f} MB/100k, the loop's {TRACE_BYTES_PER_STEP} bytes per step "
                          f"of trace arrays); fds and kernel threads: |slope| < {COUNT_LIMIT_PER_100K} per "
                          "100k steps and the last count equal to the count at the end of the warm-up "
                          f"(first {WARMUP_FRACTION:.0%} of the steps)",
        "raw_rss_slope_within_limit": (stats["rss_mb"]["slope_per_100k"] is not None
                                       and abs(stats["rss_mb"]["slope_per_100k"]) < RSS_LIMIT_MB_PER_100K),
        "checks": checks,
        "all_checks_pass": not failed,
        "before_fit": b,
        "after_close": a,
        "samples": res["samples"],
        "store_mb": store_mb,
        "checkpoint_groups_left": n_ckpt_dirs,
        "posterior_mean": res["mean"],
        "truth": res["truth"],
        "mlflow_warned": res["mlflow_warned"],
        "warnings": res["warnings"],
        "error": res["error"],
        "notes": {
            "it_per_s_after_warmup": "(steps between the warm-up-end sample and the last sample) / "
                                     "(time between them), from the callback's timestamps",
            "it_per_s": "n / sum of the store's step_seconds trace (checkpoints, MLflow batching and the "
                        "sampling callback included); fit_wall_s is the whole fit() call (compile, "
                        "posterior draws, MLflow artifacts, Ray start on the ray backend)",
            "samples": "driver process only: rss_mb = /proc/self/statm resident x page size; fds = "
                       "entries of /proc/self/fd; threads_py = threading.active_count(); threads_os = "
                       "Threads: of /proc/self/status; t = time.perf_counter()",
            "slopes": "least squares over the samples at or after the warm-up end, per 100,000 steps",
        },
    }
    write_result(args.json, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
