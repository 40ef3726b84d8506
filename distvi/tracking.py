"""MLflow tracking: one MLflow run per fit, logged by the driver only, never in the way.

Metrics go to MLflow in batches from a background thread (``log_batch``, at most 1,000
metrics a call), so a step never waits for the tracking server. If the server cannot be
reached, or dies during the run, the fit goes on: one warning, and the Zarr run store is
complete regardless.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from distvi.redact import redact
from distvi._validate import is_int

MAX_BATCH = 1000
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


DB_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic")  # they log a new database's set-up


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    """These loggers at WARNING and above only, for the ``with`` block."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def git_commit(cwd: str | None = None) -> str | None:
    """The current git commit of ``cwd``, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class MLflowTracking:
    """Where and how a fit is recorded in MLflow.

    Parameters
    ----------
    experiment
        The experiment's name (created when missing).
    run_name
        The run's name (MLflow picks one when None).
    tracking_uri
        Default: MLflow's own default (``MLFLOW_TRACKING_URI``, else a SQLite file
        ``mlflow.db`` in the working directory).
    log_every
        Steps per batch of metrics: at the end of each window, the loss of that step, the
        window's running loss, gradient norm, step seconds, rows/s and learning rate. Every
        step's loss is in the run store's trace; MLflow gets one point per window (its
        SQLite store costs ~0.2 ms per metric, which on a fast run would cost more than the
        steps).
    artifact_location
        For an experiment this creates on a local store: where its artifacts go (default
        ``./mlartifacts``), so nothing lands in a surprise ``./mlruns``.
    max_store_mb
        The run store is logged as an artifact when it is at most this large.
    min_interval_s
        Seconds between calls to MLflow (default 5): windows that end sooner are sent
        together with the next one (each at its own step). A call to a SQLite store costs
        ~40 ms whatever its size; this bounds what tracking costs a fast run.
    """

    def __init__(self, experiment: str = "distvi", run_name: str | None = None,
                 tracking_uri: str | None = None, log_every: int = 100,
                 artifact_location: str | None = None, max_store_mb: float = 50.0,
                 min_interval_s: float = 5.0) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise TypeError(f"experiment must be a non-empty str, got {experiment!r}")
        if not is_int(log_every) or log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
        if not (isinstance(max_store_mb, int | float) and max_store_mb >= 0):
            raise ValueError(f"max_store_mb must be a number >= 0, got {max_store_mb!r}")
        if not (isinstance(min_interval_s, int | float) and min_interval_s >= 0):
            raise ValueError(f"min_interval_s must be a number >= 0, got {min_interval_s!r}")
        self.min_interval_s = float(min_interval_s)
        self._pending: list = []
        self._last_send = 0.0
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri, self.log_every = tracking_uri, log_every
        self.artifact_location, self.max_store_mb = artifact_location, float(max_store_mb)
        self.run_id: str | None = None
        self._title = "loss"
        self.warned = False
        self._client = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ failures
    def _fail(self, what: str, err: BaseException) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(redact(f"MLflow tracking stopped ({what}: {type(err).__name__}: {err}); "
                                 f"the fit goes on and the run store is complete"),
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ lifecycle
    def start(self, params: dict[str, Any], tags: dict[str, str],
              parent_run_id: str | None = None) -> str | None:
        """Create the run (a nested run under ``parent_run_id`` for a resume); None if MLflow
        cannot be reached (warned once)."""
        self.run_id, self.warned = None, False  # a tracker may serve several fits
        self._queue = self._thread = None
        self._pending, self._last_send = [], 0.0
        self._title = plot_title(params)
        # fail fast on an unreachable server instead of MLflow's minutes of retries (for this
        # run only: restored by finish())
        import mlflow

        uri = self.tracking_uri or mlflow.get_tracking_uri()
        env = dict(RETRY_ENV)
        if redact(uri) != uri:  # MLflow prints the run's URL, credentials and all
            env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self._saved_env = {k: os.environ.get(k) for k in env}
        for k, v in env.items():
            os.environ.setdefault(k, v)
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            if uri.startswith("sqlite:///"):  # SQLite does not create the file's directory
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            with _quiet(DB_SETUP_LOGGERS):  # a new SQLite file: two INFO lines about its tables
                self._client = MlflowClient(tracking_uri=uri)
                exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = self.artifact_location
                if location is None and not uri.startswith(("http://", "https://", "databricks")):
                    location = Path("mlartifacts").resolve().as_uri()
                exp_id = self._client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            all_tags = {k: redact(str(v)) for k, v in tags.items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=all_tags)
            self.run_id = run.info.run_id
            flat: dict[str, str] = {}
            _flat("", params, flat)
            items = [Param(k, redact(v)) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as err:  # unreachable server, bad URI, ...
            self._fail("could not start the MLflow run", err)
            self.run_id = None
            self._restore_env()
            return None
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="distvi-mlflow", daemon=True)
        self._thread.start()
        return self.run_id

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.warned:
                continue  # the server failed once: drop the rest
            try:
                job()
            except Exception as err:
                self._fail("logging failed", err)

    def log_steps(self, steps: np.ndarray, losses: np.ndarray | None, window: dict[str, float]) -> None:
        """Queue one batch at the window's last step: that step's loss and the window's
        summary metrics."""
        if self.run_id is None or self.warned:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        last = int(steps[-1])
        values = dict(window)
        if losses is not None:
            values["loss"] = float(losses[-1])
        self._pending += [Metric(k, float(v), now, last) for k, v in values.items() if np.isfinite(v)]
        if time.monotonic() - self._last_send >= self.min_interval_s:
            self._send()

    def _send(self) -> None:
        if not self._pending or self.run_id is None:
            return
        metrics, self._pending = self._pending, []
        self._last_send = time.monotonic()
        client, run_id = self._client, self.run_id

        def send():
            for i in range(0, len(metrics), MAX_BATCH):
                client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH])

        self._queue.put(send)

    def finish(self, status: str, hist: np.ndarray, idata=None, store_dir: str | None = None,
               store_bytes: int | None = None, timeout_s: float = 120.0) -> None:
        """Artifacts (loss curve, posterior summary, the store when small), then the run's
        end status; waits up to ``timeout_s`` for the queue to drain."""
        if self.run_id is None:
            return
        self._send()
        client, run_id = self._client, self.run_id

        def artifacts():
            with tempfile.TemporaryDirectory() as tmp:
                if hist is not None and len(hist):
                    png = Path(tmp) / "loss.png"
                    _loss_plot(hist, png, self._title)
                    client.log_artifact(run_id, str(png))
                if idata is not None:
                    import arviz as az

                    csv = Path(tmp) / "posterior_summary.csv"
                    az.summary(idata, kind="stats").to_csv(csv)
                    client.log_artifact(run_id, str(csv))
            if store_dir and store_bytes is not None and store_bytes <= self.max_store_mb * 2**20:
                client.log_artifacts(run_id, store_dir, artifact_path="store")

        def end():
            client.set_terminated(run_id, status=status)

        self._queue.put(artifacts)
        self._queue.put(end)
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._fail("finishing", TimeoutError(f"MLflow did not answer within {timeout_s:.0f} s"))
            return  # the thread may still call MLflow: its settings (no URL printing) stay
        elif self.warned:
            try:  # a batch failed: still try to close the run rather than leave it RUNNING
                end()
            except Exception:
                pass
        self._restore_env()

    def log_outcome(self, outcome: dict[str, Any]) -> None:
        """How the start and the convergence went (see
        :func:`distvi.recording.outcome_of`): tags ``distvi.start`` and
        ``distvi.stop_reason``, metrics ``start_gradient_evaluations``, ``converged``,
        ``converged_step``, ``phases`` and ``gradient_evaluations``, and ``outcome.json``."""
        if self.run_id is None:
            return
        client, run_id = self._client, self.run_id
        start, conv = outcome.get("start"), outcome.get("convergence")

        def send():
            import json

            if start is not None:
                client.set_tag(run_id, "distvi.start", start["method"])
                client.log_metric(run_id, "start_gradient_evaluations",
                                  float(start["gradient_evaluations"]))
            if conv is not None:
                client.set_tag(run_id, "distvi.stop_reason", conv["reason"])
                for key, value in (("converged", float(conv["converged"])),
                                   ("converged_step", float(conv["step"])),
                                   ("phases", float(len(conv["phases"]))),
                                   ("gradient_evaluations", float(conv["gradient_evaluations"]))):
                    client.log_metric(run_id, key, value)
            client.log_text(run_id, json.dumps(outcome, indent=1), "outcome.json")

        self._queue.put(send)

    def log_diagnosis(self, diagnosis) -> None:
        """The PSIS diagnostic of the fit's approximation into its (finished) run: metrics
        ``psis_khat`` and ``psis_ess``, tag ``distvi.psis_verdict``. A failure warns."""
        if self.run_id is None:
            return
        try:
            self._client.log_metric(self.run_id, "psis_khat", float(diagnosis.khat))
            self._client.log_metric(self.run_id, "psis_ess", float(diagnosis.ess))
            self._client.set_tag(self.run_id, "distvi.psis_verdict", diagnosis.verdict)
        except Exception as err:
            warnings.warn(redact(f"MLflow: could not log the diagnostic: {type(err).__name__}: {err}"),
                          RuntimeWarning, stacklevel=3)

    def _restore_env(self) -> None:
        for k, v in getattr(self, "_saved_env", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plot_title(params: dict[str, Any]) -> str:
    """``loss.png``'s title from a run's params: method, model and rows, where given."""
    title = str(params.get("method", "loss"))
    if params.get("model") is not None:
        title += f" on {params['model']}"
    rows = params.get("data", {}).get("rows") if isinstance(params.get("data"), dict) else None
    if rows is not None:
        title += f" ({rows:,} rows)" if isinstance(rows, int) else f" ({rows} rows)"
    return redact(title)


RUNNING_MEAN_STEPS = 50  # the running mean spans 1/50 of the run ...
MIN_RUNNING_MEAN = 10  # ... and at least 10 steps


def loss_figure(hist: np.ndarray, title: str = "loss"):
    """The loss curve of a fit: each step's loss (thin) and its trailing running mean over a
    fiftieth of the run (at least 10 steps), on a symlog axis.

    The loss (-ELBO, in nats) spans orders of magnitude over a run and may be negative, so
    the axis is symmetric-log: logarithmic beyond 1 nat either side of 0, linear within it
    (differences below a nat are minibatch noise on any model this is used for).

    Examples
    --------
    >>> fig = loss_figure(np.linspace(100.0, -5.0, 200), title="ADVI on m:model")
    >>> fig.axes[0].get_yscale(), fig.axes[0].get_title()
    ('symlog', 'ADVI on m:model')
    """
    # not pyplot: no backend to choose for the user's process, no figure registry to leak into
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator

    hist = np.asarray(hist, dtype="float64")
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = np.arange(1, len(hist) + 1)
    ax.plot(steps, hist, lw=0.5, alpha=0.5, label="loss")
    w = max(min(MIN_RUNNING_MEAN, len(hist)), len(hist) // RUNNING_MEAN_STEPS)
    finite = np.isfinite(hist)
    if w >= 2:
        # over finite losses only: one inf step would blank its whole window
        sums = np.convolve(np.where(finite, hist, 0.0), np.ones(w), mode="valid")
        counts = np.convolve(finite.astype("float64"), np.ones(w), mode="valid")
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.plot(steps[w - 1:], sums / counts, lw=1.5, color="C1",
                    label=f"running mean ({w} steps)")
    ax.set_yscale("symlog", linthresh=1.0)
    # a run's loss often spans less than a decade, where decade ticks alone leave the axis
    # bare: then 1-9 x each decade, labelled plainly
    low, high = ax.get_ylim()
    fine = SymmetricalLogLocator(base=10, linthresh=1.0, subs=range(1, 10))
    ticks = fine.tick_values(low, high)
    if np.sum((ticks >= low) & (ticks <= high)) <= 12:
        ax.yaxis.set_major_locator(fine)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (-ELBO estimate, symlog)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def _loss_plot(hist: np.ndarray, path: Path, title: str = "loss") -> None:
    loss_figure(hist, title).savefig(path, dpi=100)


def as_tracking(tracking: Any) -> MLflowTracking | None:
    """``tracking=`` of a fit: None/False (off), True (defaults) or an :class:`MLflowTracking`."""
    if tracking is None or tracking is False:
        return None
    if tracking is True:
        return MLflowTracking()
    if isinstance(tracking, MLflowTracking):
        return tracking
    raise TypeError(f"tracking must be True, False or a distvi.MLflowTracking, got {type(tracking).__name__}")
