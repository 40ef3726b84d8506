"""Inference: the training loop over shards, and PyMC's ``fit`` entry point.

One loop serves every method: draw standard normals on the driver, ask the backend for the
summed data term at the points, run the compiled pure step. The state between steps is a
:class:`~distvi.step.DriverState` of plain arrays.
"""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distvi import optimizers
from distvi._rng import DRIVER_STREAM, Stream, check_seed
from distvi.errors import NotFiniteError
from distvi.approximations import LATER, Approximation, Empirical, FullRank, MeanField
from distvi.operators import KL, KSD
from distvi.stein import RBF, as_kernel, median_bracket, median_from, particle_bounds
from distvi.step import CompiledStep, DriverState, SteinStep

DRAW_BLOCK = 256
DRAWS_IN_STORE = 1000  # posterior draws written to a run store at the end
CHECKPOINT_SECONDS = 60.0  # checkpoint cadence when no checkpoint_every is given
BACKENDS = ("local", "ray")
MAX_STEPS = 10**9  # steps per fit call (a run continues past it with resume/refine)


def default_optimizer() -> optimizers.Optimizer:
    """distvi's default: ``adam(learning_rate=0.01)``.

    PyMC's default ``adagrad_window(learning_rate=1e-3)`` leaves the posterior sd about 9 %
    too wide on a conjugate normal model; adam is scale-free, which matters because the
    data term is in full-data units.
    """
    return optimizers.adam(learning_rate=0.01)


def _check_backend_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - {"num_cpus", "max_restarts", "timeout_s", "placement_timeout_s",
                              "startup_timeout_s", "actor_class", "path"}
    if unknown:
        raise TypeError(f"unknown backend_options {sorted(unknown)}")
    for key in ("num_cpus", "timeout_s", "placement_timeout_s", "startup_timeout_s"):
        if key in options and not (isinstance(options[key], int | float) and options[key] > 0):
            raise ValueError(f"backend_options[{key!r}] must be a number > 0, got {options[key]!r}")
    if "max_restarts" in options and not (isinstance(options["max_restarts"], int)
                                          and options["max_restarts"] >= 0):
        raise ValueError(f"backend_options['max_restarts'] must be an int >= 0, got {options['max_restarts']!r}")
    if options.get("path", "auto") not in ("auto", "plain", "compiled"):
        raise ValueError(f"backend_options['path'] must be 'auto', 'plain' or 'compiled', got {options['path']!r}")
    return options


class _DeferredSignals:
    """SIGINT and SIGTERM during a fit, held until the step ends.

    A signal is noted, and the loop stops at the next step boundary: the state is whole, the
    final checkpoint is written and the MLflow run is closed as KILLED. A second SIGINT does
    not wait (a step that never ends can still be interrupted). Handlers can only be set in
    the main thread; elsewhere signals keep their usual behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False  # a second SIGINT: stop now, keep the last committed checkpoint
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _DeferredSignals:
        return self.arm()

    def arm(self) -> _DeferredSignals:
        """Set the handlers (again after ``ray.init``, whose own SIGTERM handler aborts the
        process); the handlers to restore are those from before the first call."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._note)
                self.saved.setdefault(sig, previous)
        return self

    def _note(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def deliver(self) -> None:
        """After the clean stop: SIGTERM is handled as the process would have handled it
        (by default: exit with status 128 + 15, running ``finally`` blocks and ``atexit``);
        SIGINT ends the fit early and the fit returns, as in PyMC."""
        if self.signum != signal.SIGTERM:
            return
        previous = self.saved.get(signal.SIGTERM, signal.SIG_DFL)
        if callable(previous):
            previous(self.signum, None)
        elif previous != signal.SIG_IGN:  # the default (or a handler set outside Python)
            raise SystemExit(128 + self.signum)


def _from_pymc_optimizer(opt: Any) -> Any:
    """PyMC's own optimizer, bare (``pm.adam``) or called without loss and params
    (``pm.adam(learning_rate=0.01)``, a ``functools.partial``), as distvi's of the same name
    and hyperparameters: the same update rule (distvi's rules equal PyMC's). Anything else
    is returned as it is."""
    func, keywords = opt, {}
    if isinstance(opt, functools.partial) and not opt.args:
        func, keywords = opt.func, dict(opt.keywords)
    name = getattr(func, "__name__", None)
    if getattr(func, "__module__", "") != "pymc.variational.updates" or name not in optimizers._RULES:
        return opt
    keywords = {k: v for k, v in keywords.items() if k not in ("loss_or_grads", "params")}
    return getattr(optimizers, name)(**keywords)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


@dataclass
class Profile:
    """Seconds spent per phase over a profiled run (see :meth:`Inference.run_profiling`).

    ``phases`` holds ``draw``, ``workers``, ``transfer``, ``kernel`` (Stein methods only),
    ``update`` and ``logging``; ``wall`` is the whole loop, so ``wall - sum(phases)`` (shown as
    ``other``) is the loop's own Python bookkeeping.
    """

    n: int
    phases: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def per_step_us(self) -> dict[str, float]:
        return {k: 1e6 * v / max(self.n, 1) for k, v in self.rows().items()}

    def rows(self) -> dict[str, float]:
        """The phases, then ``other`` (wall time not in any phase) when the wall was timed."""
        rows = dict(self.phases)
        if self.wall:
            rows["other"] = max(self.wall - sum(self.phases.values()), 0.0)
        return rows

    def summary(self, file=None) -> None:
        """Print the table, as PyTensor's profile ``summary()`` that ``pymc``'s
        ``run_profiling`` returns does."""
        print(self, file=file or sys.stdout)

    def __str__(self) -> str:
        rows = self.rows()
        total = self.wall or sum(rows.values()) or 1.0
        lines = [f"{'phase':<10} {'total s':>9} {'us/step':>9} {'share':>6}"]
        for k, v in rows.items():
            lines.append(f"{k:<10} {v:9.3f} {1e6 * v / max(self.n, 1):9.1f} {v / total:6.1%}")
        if self.wall:
            lines.append(f"{'step':<10} {self.wall:9.3f} {1e6 * self.wall / max(self.n, 1):9.1f} "
                         f"{self.n / self.wall:6.0f} it/s")
        return "\n".join(lines)


class Inference:
    """Base of every method: an operator, an approximation, and where the data is.

    Parameters
    ----------
    op
        The operator class (e.g. :class:`~distvi.operators.KL`).
    approx
        The approximation to fit.
    model
        A factory ``model(data) -> pm.Model`` or a ready ``pm.Model`` (default: the model
        on the context stack).
    data
        The rows: a dict of arrays or a :class:`~distvi.data.Source` (with a factory).
    batch_size
        Rows per minibatch per shard (``None``: the whole shard, an exact gradient).
    num_workers
        Number of shards (default 1).
    backend
        ``"local"`` (default when ``num_workers`` is 1) or ``"ray"`` (one actor per shard).
    address
        The Ray cluster to join (default ``RAY_ADDRESS``; else a local instance is started,
        and shut down again by :meth:`close`).
    backend_options
        For ``"ray"``: ``num_cpus`` per worker (1), ``max_restarts`` (3), ``timeout_s`` per
        step (300), ``placement_timeout_s`` (60), ``startup_timeout_s`` (600), ``path``
        (``"auto"``: a Ray Compiled Graph when steps compute for under 2 ms, else plain
        actor calls; ``"plain"``; ``"compiled"``).
    random_seed
        Seeds the run: the driver's draws and every shard's minibatches.
    """

    # record the loss in ``hist`` when ``fit(score=None)``
    _scores_by_default = True

    def __init__(self, op: type, approx: Approximation, *, model: Any = None, data: Any = None,
                 batch_size: int | None = None, num_workers: int | None = None,
                 backend: str | None = None, address: str | None = None,
                 random_seed: int | None = None, backend_options: dict | None = None,
                 **op_kwargs: Any) -> None:
        from distvi.model import adapt

        self.backend_options = _check_backend_options(backend_options)
        self.batch_size = _positive_int("batch_size", batch_size, allow_none=True)
        self.num_workers = _positive_int("num_workers", 1 if num_workers is None else num_workers)
        if backend is None:
            backend = "local" if self.num_workers == 1 else "ray"
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
        self.backend_name = backend
        self.address = address
        self.random_seed = check_seed(random_seed)
        model = approx.model if model is None else model
        adapter, self.source = adapt(model, data)
        self.has_data = adapter.has_data
        if not self.has_data:  # priors and potentials only: fitted on the driver alone
            if backend == "ray" or self.num_workers > 1:
                import warnings

                warnings.warn("the model has no observed data: it is fitted on the driver "
                              "alone, without shard workers (num_workers and backend are "
                              "not used)", stacklevel=3)
            self.backend_name, self.num_workers = "local", 1
        elif self.num_workers > self.source.n_rows:
            raise ValueError(
                f"num_workers={self.num_workers} is more than the {self.source.n_rows} rows of data"
            )
        accepted = set(inspect.signature(op).parameters) - {"approx"}
        for key in op_kwargs:
            if key not in accepted:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
        # rows per step on each shard: batch_size for each, or a ready model's pm.Minibatch
        # batch_size split over the shards in proportion to their rows
        self._shard_batches = self._split_batches(adapter.minibatch_size)
        self.objective = op(approx, **op_kwargs)  # checks its arguments before any binding
        if approx.adapter is None:
            approx.bind(adapter)
        elif [(v.name, v.shape) for v in approx.adapter.layout] != [(v.name, v.shape) for v in adapter.layout]:
            raise ValueError("the approximation was fitted to a model with other free variables")
        else:
            approx.adapter = adapter
        approx.model = getattr(adapter, "user_model", None) or model
        approx.source = self.source
        approx._inference = self  # what approx.diagnose() evaluates the full data with
        self._recorded: tuple[str | None, Any] = (None, None)  # the last fit's store, tracker
        self._average_from: float | int | None = None
        self._average_start: int | None = None  # the step after which iterates are averaged
        self.approx = approx
        self.hist = np.zeros(0)
        self.state: DriverState | None = None
        self._optimizer: optimizers.Optimizer | None = None
        self._steps: dict[tuple, CompiledStep] = {}
        self._n_mc = 1
        self._max_norm: float | None = None
        self._backend = None
        self._finalizer = None
        self._draws = Stream(self.random_seed, DRIVER_STREAM)
        self._signals: _DeferredSignals | None = None  # set while a fit runs
        self.interrupted: str | None = None  # "SIGINT"/"SIGTERM" when the last fit was stopped by one
        self.job: dict | None = None  # the CLI config that built this Inference, kept in run stores

    def _split_batches(self, minibatch_size: int | None) -> list[int | None]:
        from distvi.data import source_bounds, split_batch

        if not self.has_data:
            return [None]
        sizes = [b - a for a, b in source_bounds(self.source, self.num_workers)]
        if self.batch_size is not None or minibatch_size is None:
            return [self.batch_size] * len(sizes)
        return split_batch(minibatch_size, sizes)

    # ---------------------------------------------------------------- resources
    @property
    def model(self):
        """The ``pm.Model`` being fitted (for a factory, built on symbolic minibatch rows)."""
        return self.approx.adapter.model

    def _ensure_backend(self):
        if self._backend is not None:
            return self._backend
        from distvi.data import source_bounds
        from distvi.worker import ShardWorker, compiled_by_points

        adapter = self.approx.adapter
        data_term = compiled_by_points(adapter.data_term())

        if self.backend_name == "ray":
            from distvi.backends.ray import RayBackend, WorkerSpec

            spec = WorkerSpec(adapter.data_term(), None, self.random_seed, tuple(self._shard_batches),
                              self._points_per_step(), self._scores_by_default)
            self._backend = RayBackend(spec, self.source, self.num_workers, address=self.address,
                                       **self.backend_options).start()
            # an Inference dropped without close() still releases its actors
            self._finalizer = weakref.finalize(self, self._backend.close)
            return self._backend
        from distvi.backends.local import LocalBackend

        workers = [] if not self.has_data else [
            ShardWorker(self.source.read(a, b), rank, self.random_seed, self._shard_batches[rank],
                        data_term)
            for rank, (a, b) in enumerate(source_bounds(self.source, self.num_workers))
        ]
        self._backend = LocalBackend(workers)
        return self._backend

    def _on_whole_shards(self, method: str, points: np.ndarray, *before) -> list:
        """``worker.method(*before, points)`` on every shard worker, over its whole shard;
        workers are started for it if they were closed, and closed again after."""
        was_open = self._backend is not None
        backend = self._ensure_backend()
        try:
            shared = backend.share(np.ascontiguousarray(points, dtype="float64"))
            return backend.call(method, (*before, shared), [()] * self.num_workers)
        finally:
            if not was_open:
                self.close()

    def full_data_logp(self, points: np.ndarray) -> np.ndarray:
        """The log-likelihood of all the rows at each flat point (S, D): every shard worker
        sums its whole shard (no minibatch)."""
        if not self.has_data:
            return np.zeros(np.shape(points)[0])
        return np.sum(self._on_whole_shards("full_logp", points), axis=0)

    def data_deterministics(self, term, points: np.ndarray) -> list[np.ndarray]:
        """The row-wise deterministics of ``term`` at each flat point (S, D), computed by the
        shard workers on their whole shards and concatenated in row order: (S, N, ...) each."""
        parts = self._on_whole_shards("deterministics", points, term)
        return [np.concatenate([p[i] for p in parts], axis=1) for i in range(len(term.names))]

    def _record_diagnosis(self, diagnosis) -> None:
        """The diagnostic into the last fit's run store and MLflow run, when it had them."""
        url, tracker = self._recorded
        if url is not None:
            from distvi.store import RunStore

            RunStore.open(url, mode="r+").set_attrs(diagnosis=diagnosis.as_dict())
        if tracker is not None:
            tracker.log_diagnosis(diagnosis)

    def _points_per_step(self) -> int:
        """How many points the workers evaluate per step."""
        return self._n_mc

    def close(self) -> None:
        """Release the backend's workers."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Inference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- configuration
    def _configure(self, obj_n_mc: int, obj_optimizer, total_grad_norm_constraint, kwargs) -> None:
        """Check every fit setting, then set them together (a bad one changes nothing)."""
        unsupported = {"tf_n_mc", "test_optimizer", "more_obj_params", "more_tf_params",
                       "more_updates", "more_replacements", "fn_kwargs"}
        for key in kwargs:
            if key in unsupported:
                raise TypeError(f"fit() keyword {key!r} is not supported by distvi's {type(self).__name__}")
            raise TypeError(f"fit() got an unexpected keyword argument {key!r}")
        n_mc = _positive_int("obj_n_mc", obj_n_mc)
        opt = default_optimizer() if obj_optimizer is None else obj_optimizer
        if any(opt is getattr(optimizers, name) for name in optimizers._RULES):
            opt = opt()  # the function itself, as PyMC takes it: its default hyperparameters
        opt = _from_pymc_optimizer(opt)
        if not isinstance(opt, optimizers.Optimizer):
            hint = ("; of PyMC's optimizers distvi takes pm.sgd ... pm.adamax, bare or called "
                    "without loss and params" if str(getattr(getattr(opt, "func", opt), "__module__",
                                                             "")).startswith("pymc") else "")
            raise TypeError(
                "obj_optimizer must be one of distvi's optimizers, e.g. "
                f"distvi.adam(learning_rate=0.01), or the function itself (distvi.adam: its "
                f"defaults); got {getattr(opt, '__qualname__', type(opt).__name__)}{hint}"
            )
        opt.learning_rate_at(0)  # a schedule's first rate: NaN is a NotFiniteError before any work
        max_norm = None
        if total_grad_norm_constraint is not None:
            max_norm = float(total_grad_norm_constraint)
            if not max_norm > 0 or not np.isfinite(max_norm):
                raise ValueError(f"total_grad_norm_constraint must be > 0, got {total_grad_norm_constraint}")
        self._n_mc, self._optimizer, self._max_norm = n_mc, opt, max_norm

    def _compiled(self) -> CompiledStep:
        # keyed by what the compiled graph depends on (an optimizer is a frozen name +
        # hyperparameters; a schedule enters as an input, so it is not part of the key)
        hyper = tuple(sorted((k, v) for k, v in self._optimizer.hyper.items() if k != "learning_rate"))
        scale = 1.0 / self._cost_divisor() if self.approx.scale_cost_to_minibatch else 1.0
        key = (self._n_mc, self._optimizer.name, hyper, self._max_norm, scale)
        if key not in self._steps:
            self._steps[key] = CompiledStep(self.approx, self.objective, self._optimizer,
                                            self._n_mc, self._max_norm, cost_scale=scale)
        return self._steps[key]

    def _cost_divisor(self) -> float:
        """``N / B``: all the rows over the rows a step evaluates (PyMC divides its loss by it
        when ``approx.scale_cost_to_minibatch`` is set)."""
        per_step = self._rows_per_step()
        return self.source.n_rows / per_step if per_step else 1.0

    def _fresh_state(self) -> DriverState:
        params = tuple(np.array(v, dtype="float64") for v in self.approx.params_values)
        opt_state = self._optimizer.init([np.shape(p) for p in params])
        prev = self.state
        return DriverState(
            params=params,
            opt_state=tuple(opt_state),
            step=0 if prev is None else prev.step,
            opt_step=0,
            draw_position=0 if prev is None else prev.draw_position,
        )

    # ---------------------------------------------------------------- public loop
    def fit(self, n: int = 10000, score: bool | None = None, callbacks: Sequence[Callable] | None = None,
            progressbar: bool = True, *, obj_n_mc: int = 1, obj_optimizer=None,
            total_grad_norm_constraint: float | None = None, store: Any = None,
            checkpoint_every: int | None = None, resume: bool = False, tracking: Any = None,
            average_from: float | int | None = None, **kwargs: Any) -> Approximation:
        """Run ``n`` steps from the current parameters with a fresh optimizer.

        Parameters
        ----------
        n
            Number of steps.
        score
            Record the loss in ``hist`` (default True; False for SVGD and ASVGD, whose
            operator has no loss).
        callbacks
            Called as ``cb(approx, losses, i)`` after each step; ``StopIteration`` ends the fit.
        progressbar
            Show progress: a live bar in a terminal, plain lines otherwise (``"bar"`` or
            ``"lines"`` to choose).
        obj_n_mc
            Points drawn from q per step.
        obj_optimizer
            An optimizer such as ``distvi.adam(learning_rate=0.01)`` (the default), or one of
            distvi's optimizer functions itself (``distvi.adam``: its default hyperparameters),
            as PyMC takes them.
        total_grad_norm_constraint
            Clip the summed gradient to this total norm.
        store
            A Zarr run store (local path or fsspec URL) to record the run in: config,
            traces, checkpoints, and the posterior draws at the end (see
            :mod:`distvi.store`). A store that exists is refused unless ``resume=True``.
        checkpoint_every
            Steps between checkpoints (needs ``store``); by default one every 60 s of wall
            time (a checkpoint costs milliseconds; fast steps would pay for it many times).
        resume
            Continue the run in ``store`` from its last checkpoint until the run has ``n``
            steps in all; the result equals an uninterrupted run. Without a store there yet,
            the run starts.
        tracking
            ``True`` or a :class:`~distvi.tracking.MLflowTracking`: record the run in MLflow.
        average_from
            Polyak-Ruppert averaging: the approximation gets the mean of the parameters over
            the steps after this point instead of the last iterate, which minibatch and Monte
            Carlo noise leave scattered around the optimum. A float in ``[0, 1)`` is a
            fraction of ``n`` (0.5: the second half), an int a number of steps. Callbacks see
            the averaged approximation once averaging has begun; the optimizer itself goes on
            from the last iterate (``inference.state.params``), so ``refine`` continues the same
            average. The average is checkpointed with the state.

        Returns
        -------
        Approximation

        Raises
        ------
        NotFiniteError
            The loss or the parameters became NaN/inf, or a learning-rate schedule gave a
            NaN/inf rate; the approximation keeps the last finite parameters. It is a
            ``FloatingPointError`` (as PyMC raises) and a ``ValueError``.
        """
        from distvi.tracking import as_tracking

        n = self._check_n(n)
        tracker = as_tracking(tracking)
        every = _check_recording(store, checkpoint_every, resume)
        average_after = _check_average_from(average_from, n)
        self._configure(obj_n_mc, obj_optimizer, total_grad_norm_constraint, kwargs)
        self._average_from = average_from
        self.interrupted = None
        self._recorded = (None, None)
        with _DeferredSignals() as signals:
            self._signals = signals
            try:
                if store is None and tracker is None:
                    self.state = self._fresh_state()
                    self._average_start = (None if average_after is None
                                           else self.state.step + average_after)
                    self._run(n, score, callbacks, progressbar)
                else:
                    self._fit_recorded(n, score, callbacks, progressbar, store, every, resume,
                                       tracker, average_after)
            finally:
                self._signals = None
                if signals.forced:  # a second Ctrl-C: out now, workers released
                    self.interrupted = "SIGINT"
                    self.close()
            if signals.signum is not None:
                self._stop_for(signals.signum)
        signals.deliver()
        return self.approx

    def _stop_for(self, signum: int) -> None:
        """After a signal stopped the loop: release the workers (and the Ray instance, when
        distvi started it) and say where the run stands."""
        self.interrupted = signal.Signals(signum).name
        self.close()
        url = self._recorded[0]
        where = (f"; the run store {url} has a checkpoint at this step: distvi.resume({url!r}, ...)"
                 if url is not None else "")
        from distvi.redact import redact

        print(redact(f"distvi: {self.interrupted} received: the fit stopped after step "
                     f"{self.state.step}{where}"), file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- recorded runs
    def settings(self) -> dict[str, Any]:
        """What rebuilds this Inference from a run store's config (see :func:`build_inference`)."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "backend": self.backend_name, "random_seed": self.random_seed}

    def _fit_config(self, total: int, every: int | None) -> dict[str, Any]:
        opt = self._optimizer
        return {"n": total, "obj_n_mc": self._n_mc, "total_grad_norm_constraint": self._max_norm,
                "checkpoint_every": every, "average_from": self._average_from,
                "optimizer": {"name": opt.name, "hyper": dict(opt.hyper)}}

    def _fit_recorded(self, n, score, callbacks, progressbar, store, every, resume, tracker,
                      average_after=None):
        from distvi.redact import redact_obj
        from distvi.store import (RunStore, StoreError, _jsonable, check_matches,
                                  data_description, layout_of, rebuild_description, versions)

        rs, parent = None, None
        if store is not None and resume and RunStore.exists(store):
            rs = RunStore.open(store, mode="r+")
            check_matches(rs, self)
            attrs = rs.attrs  # one metadata read
            recorded = attrs["config"]["fit"]
            mine = _jsonable(self._fit_config(recorded["n"], recorded["checkpoint_every"]))
            recorded.setdefault("average_from", None)  # stores written before averaging
            for key in ("optimizer", "obj_n_mc", "total_grad_norm_constraint", "average_from"):
                if recorded.get(key) != mine.get(key):
                    raise StoreError(f"run store {rs.url!r} was run with {key}={recorded.get(key)!r}; "
                                     f"this fit has {mine.get(key)!r}: a resumed run must use the same")
            every = recorded["checkpoint_every"]
            self._average_start = recorded.get("average_start")  # counted from the run's start
            ckpt = rs.last_checkpoint()
            if ckpt is None:
                self.state = self._fresh_state()
                rs.truncate(0)
            else:
                self.state = DriverState(tuple(np.array(p) for p in ckpt.params),
                                         tuple(np.array(s) for s in ckpt.opt_state),
                                         ckpt.step, ckpt.opt_step, ckpt.draw_position,
                                         tuple(np.array(a) for a in ckpt.average), ckpt.n_averaged)
                self.approx.params_values = list(self.state.average or self.state.params)
                rs.truncate(ckpt.n_trace)
                if (self._scores_by_default if score is None else score):
                    self.hist = rs.traces()["loss"]
            parent = attrs.get("mlflow_run_id")
            config = {**attrs["config"], "fit": {**recorded, "n": n}}
            rs.set_attrs(status="running", config=config, posterior_sha256=None)  # draws are stale now
            remaining = max(n - self.state.step, 0)
        else:
            self.state = self._fresh_state()
            remaining = n
            self._average_start = None if average_after is None else self.state.step + average_after
            config = {"method": type(self).__name__, "inference": self.settings(),
                      "fit": {**self._fit_config(self.state.step + n, every),
                              "average_start": self._average_start}}
            if store is not None:
                rs = RunStore.create(store, {
                    "config": config, "layout": layout_of(self.approx),
                    "approximation": [{"vfam": g.vfam, "names": [lay.name for lay in g.layout]}
                                      for g in self.approx.groups],
                    "data": redact_obj(data_description(self)), "versions": versions(),
                    "job": redact_obj(self.job),
                    # what resume(store) rebuilds the run from without model= and data=
                    "rebuild": redact_obj(rebuild_description(self.approx.model, self.source))})
        if tracker is not None:
            from distvi import __version__
            from distvi.tracking import git_commit

            tags = {"distvi.version": __version__, "distvi.method": type(self).__name__}
            if rs is not None:
                tags["distvi.store"] = rs.url
            commit = git_commit()
            if commit:
                tags["git.commit"] = commit
            run_id = tracker.start(_jsonable(config), tags, parent_run_id=parent)
            if rs is not None and run_id is not None and parent is None:
                rs.set_attrs(mlflow_run_id=run_id)
        recorder = _Recorder(rs, every, tracker, self._rows_per_step())
        self._recorded = (None if rs is None else rs.url, tracker)
        status, forced = "failed", False
        try:
            self._run(remaining, score, callbacks, progressbar, recorder=recorder)
            status = "finished" if self.state.step >= n else "stopped"
            if self._signals is not None and self._signals.signum is not None:
                status = "interrupted"  # no posterior draws: the last checkpoint is the result
        except KeyboardInterrupt:
            forced = self._signals is not None and self._signals.forced
            if forced:
                status = "interrupted"  # the last committed checkpoint stands
            raise
        finally:
            if not forced:
                recorder.close(self.state)
            idata = None
            if status in ("finished", "stopped"):
                idata = self.approx.sample(DRAWS_IN_STORE, random_seed=self.random_seed)
            if rs is not None:
                if idata is not None:
                    rs.write_posterior(idata)
                rs.set_attrs(status=status)
            if tracker is not None:
                mlflow_status = {"finished": "FINISHED", "stopped": "KILLED",
                                 "interrupted": "KILLED"}.get(status, "FAILED")
                quick = status == "interrupted"  # the process may have seconds left
                tracker.finish(mlflow_status, None if quick else self.hist, idata,
                               None if rs is None or quick else rs.url.removeprefix("file://"),
                               None if rs is None else rs.size_bytes())
        return self.approx

    def _rows_per_step(self) -> int:
        from distvi.data import source_bounds

        if not self.has_data:
            return 0
        sizes = [b - a for a, b in source_bounds(self.source, self.num_workers)]
        return sum(s if b is None else min(b, s) for s, b in zip(sizes, self._shard_batches))

    def refine(self, n: int, progressbar: bool = True) -> Approximation:
        """Run ``n`` more steps keeping the optimizer state of the last fit."""
        n = self._check_n(n)
        if self.state is None or self._optimizer is None:
            raise RuntimeError("refine() continues a fit: call fit() first")
        self._run(n, None, None, progressbar)
        return self.approx

    def run_profiling(self, n: int = 1000, obj_n_mc: int | None = None, callbacks=None,
                      progressbar: bool = False, tracking: Any = None, **kwargs: Any) -> Profile:
        """Time ``n`` steps by phase; the fit's state is left as it was.

        Phases: ``draw`` (the normals, on the driver), ``workers`` (the data term on the
        shards: their own compute time), ``transfer`` (the rest of the round trip to the
        workers: messages and waiting; 0 in process), ``kernel`` (the Stein direction, SVGD and
        ASVGD only), ``update`` (the compiled driver step), ``logging`` (the traces, the
        ``callbacks``, the progress bar and, with ``tracking``, queueing MLflow batches; the
        sending runs in a background thread), and ``other`` (the loop itself).
        """
        n = self._check_n(n)
        saved = (self.state, self._optimizer, self._n_mc, self._max_norm, self.hist, self.approx.params_values)
        if self._optimizer is None or obj_n_mc is not None or kwargs:
            self._configure(obj_n_mc or self._n_mc, kwargs.pop("obj_optimizer", self._optimizer),
                            kwargs.pop("total_grad_norm_constraint", self._max_norm), kwargs)
        if self.state is None or saved[1] is not self._optimizer:
            self.state = self._fresh_state()
        from distvi.tracking import as_tracking

        tracker = as_tracking(tracking)
        recorder = None
        if tracker is not None:
            tracker.start({"profiling_steps": n, "method": type(self).__name__},
                          {"distvi.profiling": "true"})
            recorder = _Recorder(None, None, tracker, self._rows_per_step())
        profile = Profile(n, {"draw": 0.0, "workers": 0.0, "transfer": 0.0, "update": 0.0,
                              "logging": 0.0})
        t0 = time.perf_counter()
        try:
            self._run(n, False, callbacks, progressbar, profile=profile, recorder=recorder)
        finally:
            profile.wall = time.perf_counter() - t0
            if tracker is not None:
                recorder.close(self.state)
                tracker.finish("FINISHED", np.zeros(0))
            self.state, self._optimizer, self._n_mc, self._max_norm, self.hist, params = saved
            self.approx.params_values = params
        return profile

    @staticmethod
    def _check_n(n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > MAX_STEPS:  # the loop keeps a float per step for each trace
            raise ValueError(f"n must be <= {MAX_STEPS:.0e} steps per fit, got {n}")
        return int(n)

    # ---------------------------------------------------------------- the loop
    def _run(self, n: int, score: bool | None, callbacks, progressbar: bool,
             profile: Profile | None = None, recorder: _Recorder | None = None) -> None:
        score = self._scores_by_default if score is None else bool(score)
        callbacks = list(callbacks or [])
        if n == 0:
            return
        # the first rate before any work: a schedule's NaN rate is refused with no worker started
        lr = np.array(self._optimizer.learning_rate_at(self.state.opt_step), dtype="float64")
        backend = self._ensure_backend()
        if self._signals is not None:
            self._signals.arm()
        step_fn = self._compiled()
        # a loss needs the data term's value; KSD's update does not, so unscored Stein steps
        # skip it on the workers and the progress bar shows the gradient norm instead
        with_logp = step_fn.needs_logp or score
        step_fn.with_logp = with_logp
        opt = self._optimizer
        D, S = self.approx.ndim, step_fn.n_draw
        per_draw = S * D
        st = self.state
        params, opt_state = st.params, st.opt_state
        step, opt_step, pos = st.step, st.opt_step, st.draw_position
        avg, n_avg = st.average, st.n_averaged
        avg_start = self._average_start
        points = None
        losses = np.empty(n)
        norms = np.empty(n)
        seconds = np.empty(n)
        rates = np.empty(n)
        shown = losses if with_logp else norms
        done = 0
        bar = _progress(n, progressbar)
        clock = time.perf_counter
        constant_lr = not callable(opt.hyper.get("learning_rate"))
        block = None
        signals = self._signals
        if recorder is not None:
            recorder.bind(step, losses if with_logp else None, norms, seconds, rates)
        t_end = clock()
        try:
            for i in range(n):
                if signals is not None and signals.signum is not None:
                    break  # a signal arrived: stop at this step boundary
                t0 = clock() if profile else 0.0
                j = i % DRAW_BLOCK
                if j == 0:
                    # normals for the next DRAW_BLOCK steps (+1 for the look-ahead) in one
                    # draw; the stream is position-addressed, so this equals step-by-step draws
                    block = self._draws.normal((min(DRAW_BLOCK, n - i) + 1, S, D), pos)
                    if points is None:
                        eps = block[0]
                        points = step_fn.draw(params, eps)
                eps_next = block[j + 1]
                if profile:
                    t1 = clock()
                    profile.phases["draw"] += t1 - t0
                datalogp, datagrad = backend.evaluate(points, step, with_logp)
                if profile:
                    t2 = clock()
                    # in-process backends have no transfer; remote ones report compute time
                    compute = getattr(backend, "last_compute_s", t2 - t1)
                    profile.phases["workers"] += compute
                    profile.phases["transfer"] += (t2 - t1) - compute
                if not constant_lr:
                    lr = np.array(opt.learning_rate_at(opt_step), dtype="float64")
                new_params, new_state, loss, gnorm, ok, next_points = step_fn(
                    params, opt_state, lr, eps, points, datalogp, datagrad, eps_next)
                if profile:
                    kernel_s = getattr(step_fn, "last_kernel_s", 0.0)
                    profile.phases["update"] += clock() - t2 - kernel_s
                    if kernel_s:
                        profile.phases["kernel"] = profile.phases.get("kernel", 0.0) + kernel_s
                if not ok:
                    self._raise_not_finite(step, points, datalogp, datagrad, new_params)
                if profile:
                    t3 = clock()
                params, opt_state, points, eps = new_params, new_state, next_points, eps_next
                step, opt_step, pos = step + 1, opt_step + 1, pos + per_draw
                if avg_start is not None and step > avg_start:
                    n_avg += 1
                    avg = (tuple(np.array(p) for p in params) if n_avg == 1 else
                           tuple(a + (p - a) / n_avg for a, p in zip(avg, params)))
                losses[i] = loss
                norms[i] = gnorm
                t_prev, t_end = t_end, clock()
                seconds[i] = t_end - t_prev
                rates[i] = lr
                done = i + 1
                if recorder is not None and recorder.due(step):
                    recorder.record(done, DriverState(params, opt_state, step, opt_step, pos,
                                                      avg, n_avg))
                if callbacks:  # they see the approximation the fit returns: the average, once on
                    self.approx.params_values = avg if n_avg else params
                    self.state = DriverState(params, opt_state, step, opt_step, pos, avg, n_avg)
                    for cb in callbacks:
                        cb(self.approx, losses[:done], step)
                if bar is not None and (done % bar.every == 0 or done == n):
                    bar.update(done, shown[max(0, done - bar.every):done].mean(),
                               "loss" if with_logp else "|grad|")
                if profile:
                    profile.phases["logging"] += clock() - t3
        except StopIteration:
            pass
        except KeyboardInterrupt:
            if signals is not None and signals.forced:
                raise  # the state may be torn mid-update: nothing of it is recorded
        finally:
            if bar is not None:
                bar.close()
            self.state = DriverState(params, opt_state, step, opt_step, pos, avg, n_avg)
            self.approx.params_values = avg if n_avg else params
            if score:
                self.hist = np.concatenate([self.hist, losses[:done]])

    def _raise_not_finite(self, step, points, datalogp, datagrad, new_params) -> None:
        names = self.approx.param_names_flat()
        bad = set()
        for arr in (points, datagrad):
            cols = np.flatnonzero(~np.isfinite(arr).all(axis=0))
            bad.update(names[c] for c in cols)
        if not bad:
            for (gi, key), value in zip(self.approx.param_keys, new_params):
                g, value = self.approx.groups[gi], np.asarray(value)
                if value.shape == g.indices.shape:
                    bad.update(names[g.indices[j]] for j in np.flatnonzero(~np.isfinite(value)))
                elif not np.all(np.isfinite(value)):
                    bad.update(names[j] for j in g.indices)
        if not bad:
            bad = set(names)
        raise NotFiniteError(
            f"NaN or inf at step {step}: loss or parameters became non-finite "
            f"(variables: {sorted(bad)}); the approximation keeps the last finite parameters"
        )


class _progress:
    """Progress every ``every`` steps with the running loss (or gradient norm when no loss is
    computed): a live tqdm bar (it/s, ETA) in a terminal, plain lines otherwise (CI, Ray Jobs
    logs), at most one every ``LINE_SECONDS``.

    ``mode``: True/"auto" (by whether stderr is a terminal), "bar", "lines", or False.
    """

    LINE_SECONDS = 10.0

    def __new__(cls, n: int, mode):
        if not mode:
            return None
        return super().__new__(cls)

    def __init__(self, n: int, mode) -> None:
        import sys

        if mode not in (True, "auto", "bar", "lines"):
            raise ValueError(f"progressbar must be True, False, 'auto', 'bar' or 'lines', got {mode!r}")
        if mode in (True, "auto"):
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.n, self.mode = n, mode
        self.every = max(1, min(100, n // 100))
        self.shown = 0
        self.t0 = self.t_line = time.perf_counter()
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, unit="it", smoothing=0.1)

    def update(self, done: int, running: float, label: str = "loss") -> None:
        if self.mode == "bar":
            self.bar.set_postfix_str(f"{label}={running:.4g}", refresh=False)
            self.bar.update(done - self.shown)
            self.shown = done
            return
        now = time.perf_counter()
        if now - self.t_line < self.LINE_SECONDS and done != self.n:
            return
        self.t_line = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.n - done) / rate if rate > 0 else float("inf")
        print(f"step {done}/{self.n} ({done / self.n:.0%})  {label}={running:.6g}  "
              f"{rate:.1f} it/s  ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.mode == "bar":
            self.bar.close()


class _Recorder:
    """Traces, checkpoints and MLflow batches of a recorded fit, at step boundaries."""

    def __init__(self, store, checkpoint_every: int | None, tracker, rows_per_step: int) -> None:
        self.store, self.tracker = store, tracker
        self.ckpt_every = checkpoint_every if store is not None else None
        # without an interval in steps: a checkpoint every CHECKPOINT_SECONDS of wall time
        self.by_time = store is not None and checkpoint_every is None
        self.next_ckpt_time = time.monotonic() + CHECKPOINT_SECONDS
        self.log_every = tracker.log_every if tracker is not None else None
        self.rows_per_step = rows_per_step
        self.arrays = None
        self.start_step, self.written, self.logged = 0, 0, 0
        self.last_ckpt_step = None

    def bind(self, step0: int, losses, norms, seconds, rates) -> None:
        self.start_step, self.written, self.logged = step0, 0, 0
        self.arrays = (losses, norms, seconds, rates)

    def due(self, step: int) -> bool:
        return ((self.ckpt_every is not None and step % self.ckpt_every == 0)
                or (self.log_every is not None and step % self.log_every == 0)
                or (self.by_time and time.monotonic() >= self.next_ckpt_time))

    def _rows(self, lo: int, hi: int):
        losses, norms, seconds, rates = self.arrays
        steps = np.arange(self.start_step + lo + 1, self.start_step + hi + 1)
        loss = np.full(hi - lo, np.nan) if losses is None else losses[lo:hi]
        sec = seconds[lo:hi]
        return steps, loss, norms[lo:hi], sec, rates[lo:hi], self.rows_per_step / np.maximum(sec, 1e-12)

    def _log(self, done: int) -> None:
        if self.tracker is None or done <= self.logged:
            return
        steps, loss, norm, sec, lr, _ = self._rows(self.logged, done)
        window = {"grad_norm": float(norm.mean()), "step_seconds": float(sec.mean()),
                  "rows_per_s": float(self.rows_per_step / max(float(sec.mean()), 1e-12)),
                  "learning_rate": float(lr[-1])}
        scored = self.arrays[0] is not None
        if scored:
            window["loss_running"] = float(np.mean(loss))
        self.tracker.log_steps(steps, loss if scored else None, window)
        self.logged = done

    def _write(self, done: int) -> None:
        if done > self.written:
            steps, loss, norm, sec, lr, rows = self._rows(self.written, done)
            self.store.append(steps, loss=loss, grad_norm=norm, step_seconds=sec,
                              learning_rate=lr, rows_per_s=rows)
            self.written = done

    def record(self, done: int, state: DriverState) -> None:
        if self.log_every is not None and state.step % self.log_every == 0:
            self._log(done)
        if ((self.ckpt_every is not None and state.step % self.ckpt_every == 0)
                or (self.by_time and time.monotonic() >= self.next_ckpt_time)):
            self.next_ckpt_time = time.monotonic() + CHECKPOINT_SECONDS
            self._write(done)
            self.store.checkpoint(state.params, state.opt_state, state.step, state.opt_step,
                                  state.draw_position, state.average, state.n_averaged)
            self.last_ckpt_step = state.step

    def close(self, state: DriverState | None) -> None:
        """At the end (or on an error): the remaining traces and a checkpoint of the last
        good state."""
        if self.arrays is None or state is None:
            return
        done = state.step - self.start_step
        self._log(done)
        if self.store is not None:
            self._write(done)
            if self.last_ckpt_step != state.step:
                self.store.checkpoint(state.params, state.opt_state, state.step, state.opt_step,
                                      state.draw_position, state.average, state.n_averaged)
            self.store.flush()


def _check_average_from(average_from: Any, n: int) -> int | None:
    """Steps of the fit before averaging starts, from ``average_from`` (None: no averaging)."""
    if average_from is None:
        return None
    if isinstance(average_from, bool) or not isinstance(average_from, int | float | np.integer | np.floating):
        raise TypeError(f"average_from must be a fraction of n (float) or a number of steps (int), "
                        f"got {type(average_from).__name__}")
    if isinstance(average_from, float | np.floating):
        if not 0.0 <= average_from < 1.0:
            raise ValueError(f"average_from as a fraction of n must be in [0, 1), got {average_from}")
        return int(round(float(average_from) * n))
    if not 0 <= average_from < max(n, 1):
        raise ValueError(f"average_from as a number of steps must be in [0, n={n}), got {average_from}")
    return int(average_from)


def _check_recording(store, checkpoint_every, resume) -> int | None:
    """Validate the run keywords before any work; the checkpoint interval (None: no store)."""
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if store is None:
        if resume:
            raise ValueError("resume=True needs the store to resume from (store=...)")
        if checkpoint_every is not None:
            raise ValueError("checkpoint_every needs a store to write checkpoints to (store=...)")
        return None
    from distvi.store import _url

    _url(store)
    return _positive_int("checkpoint_every", checkpoint_every, allow_none=True)


class KLqp(Inference):
    """Variational inference minimising KL(q || p) for any approximation of reparameterisable
    groups (mean-field, full-rank, or several groups together).

    Parameters
    ----------
    approx
        The :class:`~distvi.approximations.Approximation`.
    beta
        Weight of the KL part of the ELBO (``loss = -datalogp + beta (logq - varlogp)``).
    stl
        Sticking-the-landing gradient estimator.
    **kwargs
        Data keywords (``model``, ``data``, ``batch_size``, ``num_workers``, ``backend``,
        ``address``, ``random_seed``).
    """

    def __init__(self, approx: Approximation, beta: float = 1.0, stl: bool = False, **kwargs: Any) -> None:
        for g in approx.groups:
            if g.vfam == "empirical":
                raise TypeError("KLqp cannot fit an Empirical group: it has no density (fit "
                                "particles with SVGD)")
        super().__init__(KL, approx, beta=beta, stl=stl, **kwargs)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "beta": self.objective.beta, "stl": self.objective.stl}


def _split(kwargs: dict) -> tuple[dict, dict]:
    family = {k: kwargs.pop(k) for k in ("start", "start_sigma") if k in kwargs}
    return family, kwargs


class ADVI(KLqp):
    """Automatic differentiation VI with a mean-field approximation.

    Examples
    --------
    >>> inference = ADVI(model=factory, data={"x": x}, random_seed=1)   # doctest: +SKIP
    >>> approx = inference.fit(5000)                                    # doctest: +SKIP
    """

    def __init__(self, *, beta: float = 1.0, stl: bool = False, **kwargs: Any) -> None:
        family, rest = _split(kwargs)
        super().__init__(MeanField(model=LATER, **family), beta=beta, stl=stl, **rest)


class FullRankADVI(KLqp):
    """ADVI with a full-rank (multivariate normal) approximation."""

    def __init__(self, *, beta: float = 1.0, stl: bool = False, **kwargs: Any) -> None:
        family, rest = _split(kwargs)
        super().__init__(FullRank(model=LATER, **family), beta=beta, stl=stl, **rest)


# n^2 D of the kernel work from which the shard workers compute phi by slices of particles.
# Measured on the 2-core development machine (benchmarks/bench_svgd.py, 2 workers): at
# n^2 D = 1e8 the driver takes 32 ms against the workers' 63 ms; at 4.2e8, 187 ms against 150.
SHARD_KERNEL_ABOVE = 3e8


class ImplicitGradient(Inference):
    """Inference whose update direction is given by an operator rather than a loss's gradient.

    The base of :class:`SVGD` and :class:`ASVGD`: the workers return the summed, scaled data
    term's gradient at the points, the driver adds the prior's, and the Stein direction
    ``phi`` (see :mod:`distvi.stein`) moves the points, the particles themselves or, through
    the chain rule, the parameters of a parametric approximation.

    Parameters
    ----------
    approx
        An all-Empirical approximation (particles) or a reparameterisable one (mean-field,
        full-rank groups).
    estimator
        The operator (:class:`~distvi.operators.KSD`).
    kernel
        The kernel class or instance (default :class:`~distvi.stein.RBF`).
    shard_kernel_above
        The kernel work (n points, dimension D) goes to the workers, by slices of points,
        when ``n * n * D`` is at least this (default 3e8, measured); below it the driver
        does it.
        ``0`` always sends it, ``float("inf")`` never does. The numbers do not depend on it
        beyond rounding.
    **kwargs
        ``temperature`` (for KSD) and the data keywords of :class:`Inference`.
    """

    def __init__(self, approx: Approximation, estimator: type = KSD, kernel: Any = RBF,
                 shard_kernel_above: float = SHARD_KERNEL_ABOVE, **kwargs: Any) -> None:
        if not (isinstance(estimator, type) and issubclass(estimator, KSD)):
            raise TypeError(f"estimator must be distvi.KSD (or a subclass), got {estimator!r}")
        self.kernel = as_kernel(kernel)
        if isinstance(shard_kernel_above, bool) or not isinstance(shard_kernel_above, int | float):
            raise TypeError(f"shard_kernel_above must be a number, got {type(shard_kernel_above).__name__}")
        if not shard_kernel_above >= 0:
            raise ValueError(f"shard_kernel_above must be >= 0, got {shard_kernel_above}")
        self.shard_kernel_above = float(shard_kernel_above)
        kinds = {g.vfam == "empirical" for g in approx.groups}
        if len(kinds) > 1:
            raise TypeError("an approximation for Stein methods is either all Empirical groups "
                            "(particles) or none (draws from q); this one mixes them")
        super().__init__(estimator, approx, **kwargs)
        self.kernel_sharded: bool | None = None
        self._token = 0

    # as in PyMC, KSD has no loss: ``hist`` is recorded only with ``fit(score=True)``, which
    # makes the workers compute the data term's value too (for a logistic likelihood that is
    # most of their work)
    _scores_by_default = False

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.objective.temperature,
                "shard_kernel_above": self.shard_kernel_above}

    def _points_per_step(self) -> int:
        if self.approx.all_histograms:
            return self.approx.joint_histogram.shape[0]
        return self._n_mc

    def _compiled(self) -> SteinStep:
        hyper = tuple(sorted((k, v) for k, v in self._optimizer.hyper.items() if k != "learning_rate"))
        n = self._points_per_step()
        key = ("stein", n, self._optimizer.name, hyper, self._max_norm)
        if key not in self._steps:
            self._steps[key] = SteinStep(self.approx, self.objective, self._optimizer, n,
                                         self._max_norm, self._direction)
        return self._steps[key]

    def _direction(self, points: np.ndarray, grads: np.ndarray, temperature: float) -> np.ndarray:
        """The Stein direction at ``points``: on the driver, or by slices of particles on the
        workers (the driver then only brackets and selects the bandwidth's median)."""
        n, d = points.shape
        kernel, backend = self.kernel, self._backend
        k = backend.num_workers
        self.kernel_sharded = k > 0 and n >= k and n * n * d >= self.shard_kernel_above
        if not self.kernel_sharded:
            H = kernel.sq_dists(points)
            return kernel.phi_rows(points, grads, kernel.bandwidth(points, H), temperature, H=H)
        self._token += 1
        own = [(lo, hi, self._token) for lo, hi in particle_bounds(n, k)]
        X = backend.share(points)
        a, b = median_bracket(backend.call("stein_sample", (kernel, X), own), n * n)
        med = median_from(backend.call("stein_bracket", (kernel, X), [(*o, a, b) for o in own]), n * n)
        if med is None:  # the sample misled the bracket: take every value
            med = median_from(backend.call("stein_bracket", (kernel, X),
                                           [(*o, -np.inf, np.inf) for o in own]), n * n)
        h = kernel.bandwidth_from_median(med, n)
        parts = backend.call("stein_rows", (kernel, X, backend.share(grads), h, temperature), own)
        return np.concatenate(parts, axis=0)


class SVGD(ImplicitGradient):
    """Stein variational gradient descent: ``n_particles`` particles moved by the Stein direction.

    As PyMC's ``SVGD``, plus minibatches (the direction uses the workers' summed, scaled
    gradient) and a seeded start: the particles begin at ``start`` (default the model's
    initial point) plus normal noise of sd ``jitter`` drawn from ``random_seed``. The
    approximation is :func:`~distvi.approximations.Empirical` over the particles.

    KSD has no loss of its own: with ``fit(score=True)``, ``hist`` records the mean over
    particles of the negative log density (full-data units).
    """

    def __init__(self, n_particles: int = 100, jitter: float = 1, model: Any = None,
                 start: dict | None = None, random_seed: int | None = None, estimator: type = KSD,
                 kernel: Any = RBF, **kwargs: Any) -> None:
        if isinstance(n_particles, bool) or not isinstance(n_particles, int | np.integer):
            raise TypeError(f"n_particles must be an int, got {type(n_particles).__name__}")
        if n_particles < 2:
            raise ValueError(f"n_particles must be >= 2 (the kernel needs pairs), got {n_particles}")
        seed = check_seed(random_seed)
        approx = Empirical(size=int(n_particles), jitter=jitter, start=start, random_seed=seed,
                           model=LATER)
        super().__init__(approx, estimator=estimator, kernel=kernel, model=model,
                         random_seed=seed, **kwargs)
        self.n_particles, self.jitter = int(n_particles), float(jitter)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "n_particles": self.n_particles, "jitter": self.jitter}


class ASVGD(ImplicitGradient):
    """Amortized SVGD: a parametric approximation (default :func:`FullRank`) whose draws are
    moved along the Stein direction; ``fit`` draws ``obj_n_mc=500`` points per step.

    As in PyMC, the starting point belongs to the approximation: ``start`` is refused here
    (use ``approx=FullRank(start=...)``).
    """

    def __init__(self, approx: Approximation | None = None, estimator: type = KSD,
                 kernel: Any = RBF, **kwargs: Any) -> None:
        for key in ("start", "start_sigma"):
            if key in kwargs:
                raise TypeError(f"ASVGD() got an unexpected keyword argument {key!r}: give the "
                                f"approximation its start, e.g. approx=FullRank({key}=...)")
        import warnings

        warnings.warn(  # as PyMC's ASVGD, whose users' code may expect this warning
            "You are using experimental inference Operator (ASVGD): it needs a careful choice "
            "of temperature (default 1, which tends to underestimate the posterior variance; "
            "> 1 explores more) and many draws per step (obj_n_mc)", UserWarning, stacklevel=2)
        super().__init__(FullRank(model=LATER) if approx is None else approx, estimator=estimator,
                         kernel=kernel, **kwargs)

    def fit(self, n: int = 10000, score: bool | None = None, callbacks: Sequence[Callable] | None = None,
            progressbar: bool = True, *, obj_n_mc: int = 500, **kwargs: Any) -> Approximation:
        return super().fit(n, score, callbacks, progressbar, obj_n_mc=obj_n_mc, **kwargs)


METHODS: dict[str, type[Inference]] = {"advi": ADVI, "fullrank_advi": FullRankADVI,
                                       "svgd": SVGD, "asvgd": ASVGD}


def fit(n: int = 10000, method: str | Inference = "advi", model: Any = None,
        random_seed: int | None = None, start: dict | None = None, start_sigma: dict | None = None,
        inf_kwargs: dict | None = None, *, data: Any = None, batch_size: int | None = None,
        num_workers: int | None = None, backend: str | None = None, address: str | None = None,
        backend_options: dict | None = None, **kwargs: Any) -> Approximation:
    """Fit an approximation, as ``pymc.fit`` does, on sharded data.

    Parameters
    ----------
    n
        Number of steps.
    method
        ``"advi"``, ``"fullrank_advi"``, ``"svgd"``, ``"asvgd"``, or an :class:`Inference`
        instance.
    model
        A factory ``model(data) -> pm.Model``, a ready ``pm.Model``, or ``None`` for the
        model on the context stack.
    random_seed, start, start_sigma
        As in PyMC.
    inf_kwargs
        Extra keywords for the Inference class (e.g. ``beta``, ``stl``).
    data, batch_size, num_workers, backend, address
        Where the rows are and how they are split (see :class:`Inference`).
    **kwargs
        Passed to :meth:`Inference.fit` (``obj_optimizer``, ``obj_n_mc``,
        ``total_grad_norm_constraint``, ``callbacks``, ``progressbar``, ``score``, and the
        run keywords ``store``, ``checkpoint_every``, ``resume``, ``tracking``).

    Returns
    -------
    Approximation

    Examples
    --------
    >>> approx = fit(2000, model=factory, data={"x": x}, random_seed=1)   # doctest: +SKIP
    >>> idata = approx.sample(1000)                                      # doctest: +SKIP
    """
    n = Inference._check_n(n)
    inf_kwargs = dict(inf_kwargs or {})
    if isinstance(method, Inference):
        given = {k: v for k, v in dict(model=model, random_seed=random_seed, start=start,
                                        start_sigma=start_sigma, inf_kwargs=inf_kwargs or None,
                                        data=data, batch_size=batch_size, num_workers=num_workers,
                                        backend=backend, address=address,
                                        backend_options=backend_options).items() if v is not None}
        if given:
            raise TypeError(f"method is an Inference instance, which already has its settings; "
                            f"{sorted(given)} would be ignored")
        inference = method
    elif isinstance(method, str):
        key = method.lower()
        if key not in METHODS:
            raise KeyError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
        if start is not None:
            inf_kwargs["start"] = start
        if start_sigma is not None:
            inf_kwargs["start_sigma"] = start_sigma
        inference = METHODS[key](model=model, data=data, batch_size=batch_size,
                                 num_workers=num_workers, backend=backend, address=address,
                                 random_seed=random_seed, backend_options=backend_options,
                                 **inf_kwargs)
    else:
        raise TypeError(f"method must be a str or an Inference instance, got {type(method).__name__}")
    if inference is method:
        return inference.fit(n, **kwargs)
    with inference:  # the workers of a one-shot fit are released on exit, error or Ctrl-C
        return inference.fit(n, **kwargs)


REBUILDABLE = {"ADVI": ADVI, "FullRankADVI": FullRankADVI, "SVGD": SVGD, "ASVGD": ASVGD}


def build_inference(config: dict[str, Any], model: Any, data: Any = None, **overrides: Any) -> Inference:
    """The Inference a run store's ``config`` describes, on ``model`` and ``data``
    (``overrides`` replace recorded settings, e.g. ``backend`` or ``address``)."""
    from distvi.store import StoreError

    method = config.get("method")
    if method not in REBUILDABLE:
        raise StoreError(f"a {method!r} run is not rebuilt from its store: build the Inference "
                         f"yourself and call its fit(..., store=..., resume=True)")
    settings = dict(config.get("inference", {}))
    if isinstance(settings.get("shard_kernel_above"), str):
        settings["shard_kernel_above"] = float(settings["shard_kernel_above"])
    settings.update(overrides)
    return REBUILDABLE[method](model=model, data=data, **settings)


def _recorded_optimizer(fit_config: dict[str, Any]) -> optimizers.Optimizer:
    from distvi.store import StoreError

    opt = fit_config["optimizer"]
    hyper = dict(opt["hyper"])
    if isinstance(hyper.get("learning_rate"), str):
        raise StoreError("the run used a learning-rate schedule, which a store cannot hold: "
                         "pass the same obj_optimizer= to resume it")
    return optimizers.Optimizer(opt["name"], hyper)


def resume(store: Any, n: int | None = None, model: Any = None, data: Any = None, *,
           obj_optimizer=None, callbacks: Sequence[Callable] | None = None,
           progressbar: bool = True, tracking: Any = None, **overrides: Any) -> Approximation:
    """Continue the run in ``store`` from its last checkpoint until it has ``n`` steps
    (default: the ``n`` it was started with); the store refuses a model or data other than
    it was written for.

    Without ``model=``, the model factory is imported by the ``module:qualname`` the store
    records (a factory defined in ``__main__``, a lambda or closure, or a ready ``pm.Model``
    has none: the error says to pass ``model=``); without ``data=``, a Zarr or Parquet source
    is opened again by the path it records (in-memory arrays must be given again). This
    imports and runs code a store names: resume only stores you trust.

    Examples
    --------
    >>> approx = resume("runs/logreg.zarr", model=factory, data=source)   # doctest: +SKIP
    >>> approx = resume("runs/logreg.zarr")      # an importable factory, Zarr data  # doctest: +SKIP
    """
    from distvi.store import RunStore, StoreError, rebuilt_model_and_data

    rs = RunStore.open(store)
    attrs = rs.attrs
    config = attrs["config"]
    fit_config = config["fit"]
    total = fit_config["n"] if n is None else Inference._check_n(n)
    opt = obj_optimizer if obj_optimizer is not None else _recorded_optimizer(fit_config)
    if fit_config.get("checkpoint_every") is None:
        raise StoreError(f"run store {rs.url!r} has no checkpoint interval recorded")
    model, data = rebuilt_model_and_data(rs.url, attrs, model, data)
    inference = build_inference(config, model, data, **overrides)
    with inference:
        return inference.fit(total, callbacks=callbacks, progressbar=progressbar,
                             obj_n_mc=fit_config["obj_n_mc"], obj_optimizer=opt,
                             total_grad_norm_constraint=fit_config["total_grad_norm_constraint"],
                             average_from=fit_config.get("average_from"),
                             store=store, resume=True, tracking=tracking)

