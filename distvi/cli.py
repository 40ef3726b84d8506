"""The ``distvi`` command: run a config, resume a run, summarise a run store.

    distvi run CONFIG.yaml [--set key=value ...]
    distvi resume STORE [--n N]
    distvi summary STORE
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from distvi.config import ConfigError, build_source, load, resolve, validate
from distvi.redact import redact, strip_masked

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # SIGINT stopped the fit (SIGTERM exits with 143)


def build(cfg: dict[str, Any]):
    """The Inference and the fit keywords a validated config describes."""
    from distvi import optimizers
    from distvi.config import optimizer_defaults
    from distvi.runs import METHODS
    from distvi.tracking import MLflowTracking

    model = resolve(cfg["model"], "model")
    source = build_source(cfg["data"])
    check_starts(cfg, model, source)
    starts = {k: cfg[k] for k in ("start", "start_sigma") if cfg.get(k) is not None}
    try:
        inference = METHODS[cfg["method"]](
            model=model, data=source, batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
            backend=cfg["backend"], address=cfg["address"], random_seed=cfg["seed"],
            local=cfg["local"], **starts, **cfg["method_options"])
    except ValueError as err:
        if "start" in starts and "outside the support" in str(err):
            raise ConfigError(f"start: {err}") from None
        raise
    inference.job = cfg
    opt = dict(cfg["optimizer"])
    name = opt.pop("name")
    decay = opt.pop("decay", None)
    if decay is not None:  # constant, then geometric decay over the rest of the run
        lr0 = opt.get("learning_rate", optimizer_defaults(name)["learning_rate"])
        opt["learning_rate"] = optimizers.GeometricDecay(
            float(lr0), float(decay["to"]), int(decay.get("start", 0.5) * cfg["n"]), cfg["n"])
    tracking = cfg["tracking"]
    if isinstance(tracking, dict):
        tracking = MLflowTracking(**tracking)
    fit_kwargs = {
        "obj_optimizer": optimizers.Optimizer(name, {**optimizer_defaults(name), **opt}),
        "total_grad_norm_constraint": cfg["total_grad_norm_constraint"],
        "store": cfg["store"], "checkpoint_every": cfg["checkpoint_every"],
        "tracking": tracking,
        "progressbar": {"auto": True, "off": False}.get(cfg["progress"], cfg["progress"]),
        "average_from": cfg["average_from"],
    }
    if cfg["obj_n_mc"] is not None:
        fit_kwargs["obj_n_mc"] = cfg["obj_n_mc"]
    return inference, fit_kwargs


def run_config(cfg: dict[str, Any], resume: bool = False, n: int | None = None, **extra: Any):
    """Fit as a validated config says; returns the Inference (closed)."""
    inference, fit_kwargs = build(cfg)
    fit_kwargs.update(extra)
    steps = cfg["n"] if n is None else n
    if steps is None:  # until converged
        fit_kwargs.update({k: cfg[k] for k in ("max_n", "tol") if cfg.get(k) is not None})
    with inference:
        inference.fit(steps, resume=resume, **fit_kwargs)
        if cfg["diagnose"] and not inference.interrupted:
            print(inference.approx.diagnose(cfg["diagnose"], random_seed=cfg["seed"]), flush=True)
    return inference


def check_starts(cfg: dict[str, Any], model, source) -> None:
    """The variables ``start`` and ``start_sigma`` name, and their values' shapes, against
    the model (built on the data's schema; nothing is fitted)."""
    import numpy as np

    from distvi.model import adapt

    named = {k: cfg[k] for k in ("start", "start_sigma") if isinstance(cfg.get(k), dict)}
    if not named:
        return
    adapter, _ = adapt(model, source)
    for key, values in named.items():
        for name, value in values.items():
            try:
                lay = adapter.var(name)
            except KeyError as err:
                raise ConfigError(f"{key}.{name}: {err.args[0]}") from None
            try:
                np.broadcast_to(np.asarray(value, dtype="float64"), lay.shape)
            except ValueError:
                raise ConfigError(f"{key}.{name} must be one value or an array of the variable's "
                                  f"shape {list(lay.shape)}, got {value!r}") from None


def summary_text(store: str, max_rows: int | None = None, sample: bool = False) -> str:
    """Run info and a posterior summary table for a run store (finished or not); with
    ``max_rows``, the table's first rows only. A store without posterior draws is summarised
    from its last checkpoint only with ``sample=True``: that imports and runs the model and
    data loader the store's job names (code named in a store runs only when asked)."""
    import arviz as az
    import numpy as np

    from distvi.runs import open_run
    from distvi.store import RunStore

    run = open_run(store)
    attrs = RunStore.open(store).attrs
    fit = run.config.get("fit", {})
    traces = run.traces
    done = int(traces["step"][-1]) if traces["step"].size else 0
    of = (f"of {fit.get('n')}" if fit.get("n") is not None else
          f"(until converged: at most {fit.get('max_n')} steps, tol {fit.get('tol')})")
    lines = [f"run store   {run.url}",
             f"method      {run.config.get('method')}   status {run.status}",
             f"steps       {done} {of} recorded; last checkpoint at step "
             f"{run.checkpoint.step if run.checkpoint else 'none'}",
             f"optimizer   {fit.get('optimizer', {}).get('name')} {fit.get('optimizer', {}).get('hyper')}",
             f"data        {run.data.get('kind')} {run.data.get('n_rows')} rows in "
             f"{len(run.data.get('shards', []))} shard(s)"]
    loss = traces["loss"][np.isfinite(traces["loss"])]
    if loss.size:
        tail = loss[-max(1, min(100, loss.size // 10)):]
        lines.append(f"loss        last {tail.size} steps: mean {tail.mean():.6g}")
    if fit.get("average_from") is not None:
        lines.append(f"averaging   iterates after step {fit.get('average_start')} "
                     f"(average_from={fit['average_from']})")
    lines += outcome_lines(attrs.get("start"), attrs.get("convergence"))
    diag = run.diagnosis
    if diag is not None:
        lines.append(f"PSIS        k-hat {float(diag.get('khat', np.nan)):.3f} ({diag.get('verdict')}), "
                     f"ESS {float(diag.get('ess', np.nan)):.0f} of {diag.get('draws')} draws")
        if diag.get("advice"):
            lines.append(f"            advice: {diag['advice']}")
    idata, job = None, attrs.get("job")
    if run.posterior_sha256 is not None:  # damaged draws are an error, not "no draws"
        idata = run.posterior()
        source = "posterior draws written at the end"
    elif run.checkpoint is None:
        lines.append("posterior   none yet (no checkpoint)")
    elif job is None or not sample:
        how = (f"distvi summary --sample {store} draws from it by importing and running "
               f"{job.get('model')!r}" if isinstance(job, dict) else
               "distvi.open_run(store, model=..., data=...) draws from it")
        lines.append(f"posterior   none written yet; last checkpoint at step {run.checkpoint.step}: {how}")
    else:
        cfg = validate(job)
        part = open_run(store, model=resolve(cfg["model"]), data=build_source(cfg["data"]))
        idata = part.approximation.sample(1000, random_seed=0)
        source = f"1000 draws from the approximation at the last checkpoint (step {run.checkpoint.step})"
    if idata is not None:
        lines.append(f"posterior   {source}:")
        table = az.summary(idata, kind="stats")
        if max_rows is not None and len(table) > max_rows:
            lines.append(table.iloc[:max_rows].to_string())
            lines.append(f"... {len(table) - max_rows} more rows: distvi summary {store}")
        else:
            lines.append(table.to_string())
    return redact("\n".join(lines))


def _number(value: Any) -> float:
    try:
        return float(value)  # a store keeps NaN as the string "nan"
    except (TypeError, ValueError):
        return float("nan")


def outcome_lines(start: Any, conv: Any) -> list[str]:
    """How a recorded fit started (``start="map"``) and why it stopped (``n=None``)."""
    lines = []
    if isinstance(start, dict):
        how = ("map (the best Pathfinder Gaussian on an L-BFGS path)" if start.get("method") == "map"
               else f"{start.get('method')} (start='map' fell back: {start.get('message')})")
        lines.append(f"start       {how}: {start.get('gradient_evaluations')} gradient evaluations, "
                     f"{start.get('iterations')} L-BFGS iterations, {_number(start.get('seconds')):.2f} s")
    if isinstance(conv, dict):
        phases = [p for p in conv.get("phases", []) if isinstance(p, dict)]
        lines.append(f"converged   {'yes' if conv.get('converged') else 'no'} ({conv.get('reason')}) "
                     f"at step {conv.get('step')}, tol {conv.get('tol')}; {len(phases)} phase(s), "
                     f"{conv.get('backoffs', 0)} backoff(s), {conv.get('gradient_evaluations')} "
                     f"gradient evaluations")
        for i, p in enumerate(phases, 1):
            change = _number(p.get("change"))
            lines.append(f"  phase {i:<3} rate {_number(p.get('learning_rate')):<10.4g} steps "
                         f"{p.get('start_step')}-{p.get('end_step')} "
                         f"({int(p.get('end_step', 0)) - int(p.get('start_step', 0))}) "
                         f"x {p.get('draws', 1)} draws {p.get('outcome')}, change {'-' if change != change else f'{change:.3g}'}")
    return lines


def job_main(doc: str, default_config: str, argv: list[str] | None = None, report=None):
    """What a job script's ``main`` does: ``--config`` and ``--set`` as ``distvi run`` takes
    them, the fit, then the summary, where the store is and how to open the MLflow UI;
    ``report(inference, cfg)`` adds the job's own output. Returns the (closed) Inference."""
    import arviz as az

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for nested keys; the value is YAML)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.set)
    except ConfigError as err:
        parser.exit(EXIT_ERROR, redact(f"distvi: error: {err}\n"))
    t0 = time.perf_counter()
    inference = run_config(cfg)
    seconds = time.perf_counter() - t0
    if inference.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if cfg["store"]:
        print(summary_text(cfg["store"], max_rows=30))
    else:
        table = az.summary(inference.approx.sample(1000, random_seed=cfg["seed"]), kind="stats")
        print(table.iloc[:30].to_string() + (f"\n... {len(table) - 30} more rows" if len(table) > 30 else ""))
    if report is not None:
        report(inference, cfg)
    print(_finished(cfg, inference, seconds))
    return inference


def _job_of(store: str):
    from distvi.store import RunStore

    return RunStore.open(store).attrs.get("job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distvi", description="Variational inference for PyMC models on sharded data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,resume,summary}")
    p_run = sub.add_parser("run", help="fit as a YAML config says",
                           description="Fit as CONFIG says. A config names code that will be run "
                                       "(model and data loader references): run only configs you trust.")
    p_run.add_argument("config", help="the YAML config file")
    p_run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (dotted for nested keys; the value is YAML)")
    p_res = sub.add_parser("resume", help="continue a run from its store's last checkpoint",
                           description="Continue the run recorded in STORE (written by 'distvi run').")
    p_res.add_argument("store", help="the run store (path or fsspec URL)")
    p_res.add_argument("--n", type=int, default=None, help="total steps of the run (default: as configured)")
    p_sum = sub.add_parser("summary", help="run info and a posterior summary",
                           description="Run info and a posterior summary table of STORE.")
    p_sum.add_argument("store", help="the run store (path or fsspec URL)")
    p_sum.add_argument("--sample", action="store_true",
                       help="without posterior draws in the store: draw from its last checkpoint "
                            "(imports and runs the model the store's job names)")
    args = parser.parse_args(argv)

    from distvi.store import StoreError

    try:
        if args.command == "run":
            cfg = load(args.config, args.set)
            t0 = time.perf_counter()
            inference = run_config(cfg)
            if inference.interrupted:
                return EXIT_INTERRUPTED
            print(_finished(cfg, inference, time.perf_counter() - t0))
        elif args.command == "resume":
            job = _job_of(args.store)
            if job is None:
                raise StoreError(f"{args.store!r} was not written by 'distvi run' (no job config "
                                 f"in it): resume it from Python with distvi.resume(...)")
            # the job was stored redacted: URLs lose their masked credentials, which then come
            # from the environment (MLFLOW_TRACKING_USERNAME/_PASSWORD, fsspec's configuration)
            cfg = {**validate(strip_masked(job)), "store": args.store}  # where the store is now
            if args.n is not None and args.n < 1:
                raise ConfigError(f"--n must be >= 1, got {args.n}")
            if cfg["n"] is None and args.n is None:
                raise ConfigError(f"{args.store!r} was fitted until converged (n: null), which is "
                                  f"not resumed phase by phase: give --n N to continue it for a "
                                  f"fixed number of steps in all, or run its config again")
            t0 = time.perf_counter()
            inference = run_config(cfg, resume=True, n=args.n)
            if inference.interrupted:
                return EXIT_INTERRUPTED
            print(_finished(cfg, inference, time.perf_counter() - t0))
        else:
            print(summary_text(args.store, sample=args.sample))
    except (ConfigError, StoreError) as err:
        print(redact(f"distvi: error: {err}"), file=sys.stderr)
        return EXIT_ERROR
    return 0


def fitted_line(cfg: dict[str, Any], inference, seconds: float) -> str:
    """What was fitted, in one line: the model reference, its observed variables, the rows
    and shards, the method, the steps and the seconds the fit took (``seconds``: start-up,
    data loading and compiling included)."""
    observed = [rv.name for rv in inference.approx.adapter.model.observed_RVs]
    outcome = (f"outcome{'s' if len(observed) > 1 else ''} {', '.join(observed)}" if observed
               else "no observed variables")
    shards = f"{inference.num_workers} shard{'s' if inference.num_workers != 1 else ''}"
    line = (f"fitted {cfg['model']} ({outcome}, {inference.source.n_rows:,} rows, {shards} on "
            f"{inference.backend_name}) with {cfg['method']}: {inference.state.step} steps in "
            f"{seconds:.1f} s")
    conv = inference.convergence
    if conv is not None:
        line += (f"; converged in {len(conv.phases)} phase(s)" if conv.converged else
                 f"; did not converge ({conv.reason})")
    return line


def _finished(cfg: dict[str, Any], inference, seconds: float) -> str:
    lines = [fitted_line(cfg, inference, seconds)]
    if cfg["store"]:
        lines.append(f"run store: {cfg['store']}  (distvi summary {cfg['store']})")
    if cfg["tracking"]:
        uri = cfg["tracking"].get("tracking_uri") if isinstance(cfg["tracking"], dict) else None
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        if uri.startswith(("http://", "https://")):
            lines.append(f"MLflow UI: {uri}")
        else:  # a local store: the UI is started on this machine, for this machine only
            lines.append(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return redact("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
