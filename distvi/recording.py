"""A recorded fit's lifecycle: the run store and the MLflow run around the loop.

:class:`RecordedFit` creates the store (or opens it to resume, refusing another model, other
data or other fit settings), starts the MLflow run, runs the loop with a
:class:`~distvi.driver.hooks.Recorder` hook, and at the end writes the posterior draws and the
status. It works on the Inference it is given through its public surface (``approx``,
``source``, ``state``, ``settings()``, ``fit_config()``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from distvi import _validate
from distvi.driver.hooks import Recorder
from distvi.driver.state import DriverState
from distvi.results import LocalDrawsTooLarge
from distvi.store import RunStore, StoreError, jsonable, store_url, versions

DRAWS_IN_STORE = 1000  # posterior draws written to a run store at the end


def check_recording(store, checkpoint_every, resume) -> int | None:
    """Validate the run keywords before any work; the checkpoint interval (None: no store)."""
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if store is None:
        if resume:
            raise ValueError("resume=True needs the store to resume from (store=...)")
        if checkpoint_every is not None:
            raise ValueError("checkpoint_every needs a store to write checkpoints to (store=...)")
        return None
    store_url(store)
    return _validate.positive_int("checkpoint_every", checkpoint_every, allow_none=True)


def record_diagnosis(url: str | None, tracker, diagnosis) -> None:
    """A diagnostic into a run store and an MLflow run, where there are."""
    if url is not None:
        RunStore.open(url, mode="r+").set_attrs(diagnosis=diagnosis.as_dict())
    if tracker is not None:
        tracker.log_diagnosis(diagnosis)


def state_of(checkpoint, optimizer) -> DriverState:
    """The driver state a checkpoint holds (its optimizer state by parameter)."""
    params = tuple(np.array(p) for p in checkpoint.params)
    return DriverState(params, optimizer.state_from_flat([np.array(s) for s in checkpoint.opt_state],
                                                         len(params)),
                       checkpoint.step, checkpoint.opt_step, checkpoint.draw_position,
                       tuple(np.array(a) for a in checkpoint.average), checkpoint.n_averaged)


class RecordedFit:
    """One fit of ``inference`` recorded in ``store`` (or None) and ``tracker`` (or None)."""

    def __init__(self, inference, store: Any, every: int | None, resume: bool, tracker) -> None:
        self.inference, self.store, self.every = inference, store, every
        self.resume, self.tracker = resume, tracker

    def _resume(self, rs: RunStore, score) -> tuple[dict, dict]:
        inf = self.inference
        check_matches(rs, inf)
        attrs = rs.attrs  # one metadata read
        recorded = attrs["config"]["fit"]
        mine = jsonable(inf.fit_config(recorded["n"], recorded["checkpoint_every"]))
        recorded.setdefault("average_from", None)  # stores written before averaging
        for key in ("optimizer", "obj_n_mc", "total_grad_norm_constraint", "average_from"):
            if recorded.get(key) != mine.get(key):
                raise StoreError(f"run store {rs.url!r} was run with {key}={recorded.get(key)!r}; "
                                 f"this fit has {mine.get(key)!r}: a resumed run must use the same")
        self.every = recorded["checkpoint_every"]
        inf._average_start = recorded.get("average_start")  # counted from the run's start
        ckpt = rs.last_checkpoint()
        if ckpt is None:
            inf.state = inf._fresh_state()
            rs.truncate(0)
        else:
            inf.state = state_of(ckpt, inf._optimizer)
            inf.approx.params_values = list(inf.state.result)
            inf.shards.resume_locals(ckpt.local_states)
            rs.truncate(ckpt.n_trace)
            if (inf._scores_by_default if score is None else score):
                inf.hist = rs.traces()["loss"]
        return attrs, recorded

    def _start(self, n: int, score, average_after) -> tuple[RunStore | None, int, dict, str | None]:
        from distvi.rebuild import rebuild_description
        from distvi.redact import redact_obj

        inf, store = self.inference, self.store
        if store is not None and self.resume and RunStore.exists(store):
            rs = RunStore.open(store, mode="r+")
            attrs, recorded = self._resume(rs, score)
            config = {**attrs["config"], "fit": {**recorded, "n": n}}
            rs.set_attrs(status="running", config=config, posterior_sha256=None)  # draws are stale now
            return rs, max(n - inf.state.step, 0), config, attrs.get("mlflow_run_id")
        inf.state = inf._fresh_state()
        inf._average_start = None if average_after is None else inf.state.step + average_after
        config = {"method": type(inf).__name__, "inference": inf.settings(),
                  "fit": {**inf.fit_config(inf.state.step + n, self.every),
                          "average_start": inf._average_start}}
        rs = None
        if store is not None:
            rs = RunStore.create(store, {
                "config": config, "layout": layout_of(inf.approx),
                "approximation": [{"vfam": g.vfam, "names": [lay.name for lay in g.layout]}
                                  for g in inf.approx.groups],
                "data": redact_obj(data_description(inf)), "versions": versions(),
                "job": redact_obj(inf.job),
                # what resume(store) rebuilds the run from without model= and data=
                "rebuild": redact_obj(rebuild_description(inf.approx.model, inf.source))})
        return rs, n, config, None

    def _start_tracking(self, rs, config, parent) -> None:
        from distvi._version import __version__
        from distvi.tracking import git_commit

        inf = self.inference
        tags = {"distvi.version": __version__, "distvi.method": type(inf).__name__}
        if rs is not None:
            tags["distvi.store"] = absolute(rs.url)
        commit = git_commit()
        if commit:
            tags["git.commit"] = commit
        params = {**config, "model": model_label(inf), "data": tracked_data(inf)}
        run_id = self.tracker.start(jsonable(params), tags, parent_run_id=parent)
        if rs is not None and run_id is not None and parent is None:
            rs.set_attrs(mlflow_run_id=run_id)

    def run(self, n: int, score, callbacks, progressbar, average_after=None) -> None:
        inf, tracker = self.inference, self.tracker
        rs, remaining, config, parent = self._start(n, score, average_after)
        if tracker is not None:
            self._start_tracking(rs, config, parent)
        recorder = Recorder(rs, self.every, tracker, inf.shards.rows_per_step)
        recorder.local_states = inf.shards.current_local_states
        inf._recorded = (None if rs is None else rs.url, tracker)
        signals = inf._signals
        status, forced = "failed", False
        try:
            inf._advance(remaining, score, callbacks, progressbar, recorder=recorder)
            status = "finished" if inf.state.step >= n else "stopped"
            if inf.convergence is not None:
                status = "stopped" if inf.convergence.reason == "stopped" else "finished"
            if signals is not None and signals.signum is not None:
                status = "interrupted"  # no posterior draws: the last checkpoint is the result
        except KeyboardInterrupt:
            forced = signals is not None and signals.forced
            if forced:
                status = "interrupted"  # the last committed checkpoint stands
            raise
        finally:
            if not forced:
                recorder.close(inf.state)
            self._finish(rs, status)

    def _finish(self, rs, status: str) -> None:
        inf, tracker = self.inference, self.tracker
        idata = None
        if status in ("finished", "stopped"):
            try:
                idata = inf.approx.sample(DRAWS_IN_STORE, random_seed=inf.random_seed)
            except LocalDrawsTooLarge as err:  # the workers write them into the store
                warnings.warn(f"the run store's posterior draws leave out the local variables "
                              f"({err}); the workers write {DRAWS_IN_STORE} draws of them into "
                              "its local_draws/ instead", stacklevel=2)
                idata = inf.approx.sample(DRAWS_IN_STORE, random_seed=inf.random_seed,
                                          include_locals=False)
                if rs is not None:
                    inf.shards.write_local_draws(rs.url, DRAWS_IN_STORE, inf.random_seed)
                    inf.approx.local_draws_store = rs.url
        outcome = jsonable(outcome_of(inf))
        if rs is not None:
            if idata is not None:
                rs.write_posterior(idata)
            rs.set_attrs(status=status, **outcome)
        if tracker is not None:
            if outcome:
                tracker.log_outcome(outcome)
            mlflow_status = {"finished": "FINISHED", "stopped": "KILLED",
                             "interrupted": "KILLED"}.get(status, "FAILED")
            quick = status == "interrupted"  # the process may have seconds left
            tracker.finish(mlflow_status, None if quick else inf.hist, idata,
                           None if rs is None or quick else rs.url.removeprefix("file://"),
                           None if rs is None else rs.size_bytes())


def outcome_of(inference) -> dict[str, Any]:
    """How the fit's start went (``start="map"``) and why a fit with ``n=None`` stopped, as
    a run store's attributes ``start`` and ``convergence``."""
    out = {}
    if inference.start_report is not None:
        out["start"] = inference.start_report.as_dict()
    if inference.convergence is not None:
        out["convergence"] = inference.convergence.as_dict()
    return out


# ---------------------------------------------------------------- what a store describes
def layout_of(approx) -> list[dict[str, Any]]:
    return [{"name": lay.name, "rv_name": lay.rv_name, "shape": list(lay.shape),
             "start": lay.start, "stop": lay.stop, "transform": lay.transform}
            for lay in approx.adapter.layout]


def check_matches(rs: RunStore, inference) -> None:
    """Refuse a store recorded for another model layout or other data."""
    attrs = rs.attrs
    mine = jsonable(layout_of(inference.approx))
    if attrs["layout"] != mine:
        raise StoreError(f"run store {rs.url!r} was written for another model: its free "
                         f"variables are {describe_layout(attrs['layout'])}, this model's are "
                         f"{describe_layout(mine)}")
    theirs, ours = attrs["data"], jsonable(data_description(inference))
    for key in ("n_rows", "arrays", "shards"):
        if theirs.get(key) != ours.get(key):
            raise StoreError(f"run store {rs.url!r} was written for other data: {key} "
                             f"{theirs.get(key)!r} there, {ours.get(key)!r} here")


def absolute(url: str) -> str:
    """A store's URL as it reads from anywhere: a path made absolute, a URL as it is."""
    import os

    return url if "://" in url else os.path.abspath(url)


def model_label(inference) -> str:
    """What was fitted, by name: the job's ``model:`` reference, else the factory's
    ``module:qualname``, else what kind of object it was."""
    job = inference.job
    if isinstance(job, dict) and isinstance(job.get("model"), str):
        return job["model"]
    model = inference.approx.model
    module, qual = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    if isinstance(module, str) and isinstance(qual, str):
        return f"{module}:{qual}"
    name = getattr(model, "name", "")
    return f"a ready {type(model).__name__}" + (f" {name!r}" if name else "")


def tracked_data(inference) -> dict[str, Any]:
    """The data of a fit as MLflow params: ``kind``, ``path`` (absolute; ``in memory`` for
    arrays), ``rows``, ``columns`` (``array[trailing shape]``, or ``array=column`` for
    Parquet), and for a job's loader its reference and options."""
    from distvi.redact import redact_obj

    desc = inference.source.describe()
    kind = str(desc.get("kind", type(inference.source).__name__))
    paths = desc.get("paths", [desc["path"]] if "path" in desc else [])
    out: dict[str, Any] = {"kind": kind}
    job = inference.job.get("data") if isinstance(inference.job, dict) else None
    if isinstance(job, dict) and job.get("kind") in ("loader", "npz"):
        out["kind"] = job["kind"]  # the source is in-memory arrays: say where they came from
        if job["kind"] == "loader":
            out["loader"], out["options"] = job["loader"], job.get("options") or {}
        else:
            paths = [job["path"]]
    out["path"] = ", ".join(absolute(str(p)) for p in paths) if paths else "in memory"
    out["rows"] = int(inference.source.n_rows)
    if kind == "parquet":
        out["columns"] = ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}=[{', '.join(v)}]"
                                   for k, v in desc["columns"].items())
    else:
        out["columns"] = ", ".join(f"{k}{list(shape)}" if shape else k
                                   for k, (_, shape) in inference.source.schema().items())
    return redact_obj(out)


def describe_layout(layout) -> str:
    return ", ".join(f"{v['name']}{tuple(v['shape'])}" for v in layout) or "none"


def data_description(inference) -> dict[str, Any]:
    from distvi.data import source_bounds

    desc = dict(inference.source.describe())
    desc["arrays"] = {k: [d, list(s)] for k, (d, s) in inference.source.schema().items()}
    desc["shards"] = [list(b) for b in source_bounds(inference.source, inference.num_workers)]
    return desc
