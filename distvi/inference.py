"""Inference: an approximation, an operator, where the data is, and the fit that runs the loop.

``Inference`` turns its settings into what the driver needs — a compiled
:class:`~distvi.driver.step.Program`, a :class:`~distvi.driver.step.Step` per fit, a backend
and the hooks — and runs the :class:`~distvi.driver.loop.Loop`. The method classes (ADVI,
SVGD, ...) are in :mod:`distvi.methods`; recorded runs in :mod:`distvi.recording`.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distvi import _validate, optimizers
from distvi._rng import DRIVER_STREAM, Stream, check_seed
from distvi.approximations import Approximation
from distvi.programs import fused_step, step_program
from distvi.driver.hooks import Callbacks, DivergenceWatch, Progress, Recorder, Trace
from distvi.driver.fused import block_hooks
from distvi.driver.loop import Loop
from distvi.driver.profile import Profile, Profiler
from distvi.backends.ray_cluster import stop_started
from distvi.driver.signals import DeferredSignals, StopOnSignal, report_stop
from distvi.driver.state import DriverState
from distvi.driver.step import Program, Step
from distvi.recording import RecordedFit, check_recording, record_diagnosis
from distvi.shard_data import Shards, check_settings


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
        (``"auto"``: a direct connection to each worker, else plain actor calls;
        ``"direct"``; ``"compiled"``, a Ray Compiled Graph; ``"plain"``).
    local
        ``{"a": "user"}``: ``a`` (its first axis indexed by the integer column ``user``) is a
        local variable, one mean-field factor per group on the worker of the group's rows.
    random_seed
        Seeds the run: the driver's draws and every shard's minibatches.
    """

    # record the loss in ``hist`` when ``fit(score=None)``; let n=None add draws of q a step
    _scores_by_default, draws_adapt = True, True

    def __init__(self, op: type, approx: Approximation, *, model: Any = None, data: Any = None,
                 batch_size: int | None = None, num_workers: int | None = None,
                 backend: str | None = None, address: str | None = None,
                 random_seed: int | None = None, backend_options: dict | None = None,
                 local: dict | None = None, **op_kwargs: Any) -> None:
        from distvi.model import adapt

        settings = check_settings(batch_size, num_workers, backend, backend_options)
        self.random_seed = check_seed(random_seed)
        model = approx.model if model is None else model
        adapter, source = adapt(model, data, local)
        self.shards = Shards(source, adapter, **settings, address=address,
                             random_seed=self.random_seed, points_per_step=self._points_per_step,
                             with_logp=self._scores_by_default)
        self.shards.label = f"the {type(self).__name__} fit"
        accepted = set(inspect.signature(op).parameters) - {"approx"}
        for key in op_kwargs:
            if key not in accepted:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
        self.objective = op(approx, **op_kwargs)  # checks its arguments before any binding
        if approx.adapter is None:
            approx.bind(adapter)
        elif [(v.name, v.shape) for v in approx.adapter.layout] != [(v.name, v.shape) for v in adapter.layout]:
            raise ValueError("the approximation was fitted to a model with other free variables")
        else:
            approx.adapter = adapter
        approx.model = getattr(adapter, "user_model", None) or model
        self.shards.record_diagnosis = lambda d: record_diagnosis(*self._recorded, d)
        approx.attach(self.shards)
        self._recorded: tuple[str | None, Any] = (None, None)  # the last fit's store, tracker
        self._average_from: float | int | None = None
        self._average_start: int | None = None  # the step after which iterates are averaged
        self.approx, self.hist = approx, np.zeros(0)
        self.state: DriverState | None = None
        self._optimizer: optimizers.Optimizer | None = None
        self._programs: dict[tuple, Program] = {}
        self._n_mc, self._max_norm = 1, None  # draws of q a step; the total gradient norm cap
        self._signals: DeferredSignals | None = None  # set while a fit runs
        self.interrupted: str | None = None  # "SIGINT"/"SIGTERM" when the last fit was stopped by one
        self.job: dict | None = None  # the CLI config that built this Inference, kept in run stores
        self._until, self._scales = None, None  # n=None: (max_n, tol); a phase's rate scales
        self.convergence = None  # why the last fit with n=None stopped (a Convergence)
        self.start_report = None  # how the last fit's start='map' went (a StartReport)
        self.gradient_evaluations = 0  # points at which the model's gradient was taken, all fits

    @property
    def converged(self) -> bool | None:
        """Whether the last fit run with ``n=None`` converged (None after a fixed ``n``)."""
        return None if self.convergence is None else self.convergence.converged

    # where the data is and how it is split: the shards' settings, as attributes
    source = property(lambda self: self.shards.source)
    has_data = property(lambda self: self.shards.has_data)
    num_workers = property(lambda self: self.shards.num_workers)
    batch_size = property(lambda self: self.shards.batch_size)
    backend_name = property(lambda self: self.shards.backend_name)
    address = property(lambda self: self.shards.address)
    backend_options = property(lambda self: self.shards.options)
    _backend = property(lambda self: self.shards.backend)

    # ---------------------------------------------------------------- resources
    model = property(lambda self: self.approx.adapter.model,
                     doc="The ``pm.Model`` being fitted (for a factory, on symbolic minibatch rows).")

    def full_data_logp(self, points: np.ndarray) -> np.ndarray:
        """The log-likelihood of all the rows at each flat point (S, D), shard by shard."""
        return self.approx.shard_data.logp(points)

    def _points_per_step(self) -> int:  # the points the workers evaluate per step
        return self._n_mc

    def close(self) -> None:  # release the backend's workers
        self.shards.close()

    def __enter__(self) -> Inference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- configuration
    def _configure(self, obj_n_mc: int, obj_optimizer, total_grad_norm_constraint, kwargs) -> None:
        """Check every fit setting, then set them together (a bad one changes nothing)."""
        _validate.no_fit_keywords(kwargs, type(self).__name__)
        n_mc = _validate.positive_int("obj_n_mc", obj_n_mc)
        # distvi's default, adam(0.01): PyMC's adagrad_window(1e-3) leaves the posterior sd ~9 %
        # too wide on a conjugate normal model; adam is scale-free (the data term: full-data units)
        opt = optimizers.as_optimizer(optimizers.adam(learning_rate=0.01) if obj_optimizer is None
                                      else obj_optimizer)
        opt.learning_rate_at(0)  # a schedule's first rate: NaN is a NotFiniteError before any work
        max_norm = _validate.max_norm(total_grad_norm_constraint)
        self._n_mc, self._optimizer, self._max_norm = n_mc, opt, max_norm

    def _draws_per_step(self) -> int:  # rows of normals the driver draws per step
        return self._n_mc

    def _cost_scale(self) -> float:
        """``B / N`` when ``approx.scale_cost_to_minibatch`` (PyMC's per-minibatch units)."""
        return 1.0 / self.shards.cost_divisor() if self.approx.scale_cost_to_minibatch else 1.0

    def _program(self) -> Program:
        return step_program(self)

    def _set_state(self, state: DriverState) -> None:
        self.state = state

    def _step(self, with_logp: bool, n: int) -> Step:
        return Step(self._program(), self.approx, self.objective, self._optimizer,
                    Stream(self.random_seed, DRIVER_STREAM), with_logp, self._average_start,
                    steps=n, start=self.state.draw_position, scales=self._scales or ())

    def _fresh_state(self) -> DriverState:
        return self._fresh_state_at(self.approx.params_values)

    def _fresh_state_at(self, params) -> DriverState:
        return DriverState.fresh(self._optimizer, params, self.state)

    # ---------------------------------------------------------------- public loop
    def fit(self, n: int | None = 10000, score: bool | None = None, callbacks: Sequence[Callable] | None = None,
            progressbar: bool = True, *, obj_n_mc: int = 1, obj_optimizer=None,
            total_grad_norm_constraint: float | None = None, store: Any = None,
            checkpoint_every: int | None = None, resume: bool = False, tracking: Any = None,
            average_from: float | int | None = None, max_n: int | None = None,
            tol: float | None = None, **kwargs: Any) -> Approximation:
        """Run ``n`` steps from the current parameters with a fresh optimizer, or until
        converged.

        Parameters
        ----------
        n
            Number of steps; ``None`` (or ``"auto"``): run until converged (see
            :mod:`distvi.convergence`), at most ``max_n`` steps (default 100,000), from
            ``start="map"`` unless the approximation has a start of its own or was fitted
            already. Then the learning rate (default ``adam(learning_rate=0.1)``) is relative
            to each coordinate's scale in q, and ``inference.converged`` and
            ``inference.convergence`` say how the fit ended.
        max_n, tol
            For ``n=None``: the most steps, and how closely successive phases must agree
            (posterior sds for the means, relative for the sds; default 0.02).
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
            the steps after this point (a float in ``[0, 1)``: a fraction of ``n``; an int: a
            number of steps) instead of the last iterate. Callbacks see the average once it
            has begun; the optimizer goes on from the last iterate (``inference.state``), so
            ``refine`` continues the same average; it is checkpointed with the state.

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
        from distvi.convergence import LEARNING_RATE, check_until
        from distvi.pathfinder import start_near_answer
        from distvi.tracking import as_tracking

        n, until = check_until(n, max_n, tol, average_from, resume, obj_optimizer)
        self.shards.check_local_fit(self.objective, until, average_from)
        tracker = as_tracking(tracking)
        every = check_recording(store, checkpoint_every, resume)
        average_after = _validate.average_from(average_from, n)
        if until is not None and obj_optimizer is None:
            obj_optimizer = optimizers.adam(learning_rate=LEARNING_RATE)
        self._configure(obj_n_mc, obj_optimizer, total_grad_norm_constraint, kwargs)
        self._average_from, self._until, self.convergence = average_from, until, None
        if getattr(self.objective, "stl_choice", False) is None:  # KL's stl=None: by the fit
            self.objective.stl = until is not None
        self.interrupted = None
        self._recorded = (None, None)
        with DeferredSignals() as signals:
            self._signals = signals
            try:
                self.start_report = start_near_answer(self, store, resume)
                if self.start_report is not None:
                    self.gradient_evaluations += self.start_report.gradient_evaluations
                if store is None and tracker is None:
                    self.state = self._fresh_state()
                    self._average_start = (None if average_after is None
                                           else self.state.step + average_after)
                    self._advance(n, score, callbacks, progressbar)
                else:
                    RecordedFit(self, store, every, resume, tracker).run(
                        n, score, callbacks, progressbar, average_after)
            finally:
                self._signals = None
                if signals.forced:  # a second Ctrl-C: out now, workers released
                    self.interrupted = "SIGINT"
                    self.close()
            if signals.signum is not None:
                self._stop_for(signals.signum)
        signals.deliver()
        self.approx.fit_info = {"method": type(self).__name__, "steps": self.state.step,
                                "gradient_evaluations": self.gradient_evaluations, "converged": self.converged}
        return self.approx

    def _advance(self, n: int, score, callbacks, progressbar, recorder=None) -> None:
        """``n`` steps, or (``n=None``) phases until converged within ``n`` steps."""
        if self._until is None:
            self._run(n, score, callbacks, progressbar, recorder=recorder)
            return
        from distvi.convergence import run_until_converged

        def phase(remaining, watch):
            self._scales = watch.program_scales()
            try:
                self._run(remaining, score, callbacks, progressbar, recorder=recorder, watch=watch)
            finally:
                self._scales = None

        self.convergence = run_until_converged(self, n, self._until[1], phase)
        self.approx.params_values = self.state.result

    def _stop_for(self, signum: int) -> None:
        """After a signal stopped the loop: release the workers (and the Ray instance, when
        distvi started it) and say where the run stands."""
        self.interrupted = signal.Signals(signum).name
        self.close()
        stop_started(signum)
        report_stop(self.interrupted, self.state.step, self._recorded[0])

    def settings(self) -> dict[str, Any]:
        """What rebuilds this Inference from a run store's config (see
        :func:`distvi.runs.build_inference`)."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "backend": self.backend_name, "random_seed": self.random_seed,
                **({"local": local} if (local := self.shards.adapter.local_spec()) else {})}

    def fit_config(self, total: int, every: int | None) -> dict[str, Any]:
        """The fit settings a run store records (and a resumed fit must repeat)."""
        opt = self._optimizer
        until = {} if self._until is None else {"n": None, "max_n": self._until[0], "tol": self._until[1]}
        return {"n": total, **until, "obj_n_mc": self._n_mc, "total_grad_norm_constraint": self._max_norm,
                "checkpoint_every": every, "average_from": self._average_from,
                "optimizer": {"name": opt.name, "hyper": dict(opt.hyper)}}

    def refine(self, n: int, progressbar: bool = True) -> Approximation:
        """Run ``n`` more steps keeping the optimizer state of the last fit."""
        n = _validate.steps(n)
        if self.state is None or self._optimizer is None:
            raise RuntimeError("refine() continues a fit: call fit() first")
        self._run(n, None, None, progressbar)
        return self.approx

    def run_profiling(self, n: int = 1000, obj_n_mc: int | None = None, callbacks=None,
                      progressbar: bool = False, tracking: Any = None, **kwargs: Any) -> Profile:
        """Time ``n`` steps by phase; the fit's state is left as it was.

        Step by step: ``draw`` (normals, points), ``workers`` (the shards' own compute),
        ``transfer`` (the rest of the round trip; 0 in process), ``kernel`` (the Stein
        direction), ``update`` (the compiled driver step). In fused blocks: ``compile``
        (the block program, when this run compiled it), ``draw`` (the block's normals,
        offsets, rates), ``block`` (the compiled block). Both: ``logging`` (the hooks:
        traces, callbacks, progress, MLflow batches) and ``other`` (the loop itself)."""
        import time

        from distvi.tracking import as_tracking

        n = _validate.steps(n)
        saved = (self.state, self._optimizer, self._n_mc, self._max_norm, self.hist, self.approx.params_values)
        if self._optimizer is None or obj_n_mc is not None or kwargs:
            self._configure(obj_n_mc or self._n_mc, kwargs.pop("obj_optimizer", self._optimizer),
                            kwargs.pop("total_grad_norm_constraint", self._max_norm), kwargs)
        if self.state is None or saved[1] is not self._optimizer:
            self.state = self._fresh_state()
        tracker = as_tracking(tracking)
        recorder = None
        if tracker is not None:
            tracker.start({"profiling_steps": n, "method": type(self).__name__},
                          {"distvi.profiling": "true"})
            recorder = Recorder(None, None, tracker, self.shards.rows_per_step)
        profiler = Profiler(n)
        t0 = time.perf_counter()
        try:
            self._run(n, False, callbacks, progressbar, recorder=recorder, profiler=profiler)
        finally:
            profiler.profile.wall = time.perf_counter() - t0
            if tracker is not None:
                recorder.close(self.state)
                tracker.finish("FINISHED", np.zeros(0))
            self.state, self._optimizer, self._n_mc, self._max_norm, self.hist, params = saved
            self.approx.params_values = params
        return profiler.profile

    # ---------------------------------------------------------------- the loop
    def _run(self, n: int, score: bool | None, callbacks, progressbar: bool,
             recorder: Recorder | None = None, profiler: Profiler | None = None,
             watch=None) -> None:
        """``n`` steps of the loop from ``self.state``, with the hooks this fit asks for."""
        score = self._scores_by_default if score is None else bool(score)
        if n == 0:
            return
        # the first rate before any work: a schedule's NaN rate is refused with no worker started
        self._optimizer.learning_rate_at(self.state.opt_step)
        backend = self.shards.start(wait=False)  # Ray's workers: asked for, ready below
        self.shards.begin_locals(self._optimizer, self.state, self.objective)
        backend = backend if watch is None else watch.backend(backend)
        signals = self._signals
        if signals is not None:
            signals.arm()
        # a loss needs the data term; KSD's update does not: unscored Stein steps skip it
        step = self._step(self.objective.needs_logp or score, n)
        trace = Trace(n, self.state.step, scored=step.with_logp)
        hooks = [trace, DivergenceWatch(trace, on_divergence=watch and watch.diverged)] \
            if step.with_logp else [trace]
        if recorder is not None:
            hooks.append(recorder.bind(trace))
        if callbacks:
            hooks.append(Callbacks(self.approx, callbacks, trace, self._set_state))
        progress = Progress(trace, n, progressbar) if progressbar else None
        if progress is not None:
            hooks.append(progress)
        if signals is not None:
            hooks.append(StopOnSignal(signals))
        if watch is not None:  # last: its StopIteration comes after every other hook saw the step
            watch.trace = trace
            hooks.append(watch)
        # in fused blocks unless a hook must see every step (then not even compiled)
        fused = fused_step(self, step, backend, watch) if block_hooks(hooks) else None
        # compiled now, not in the first update: before a profile's clock, while Ray's workers start
        if fused is None and (profiler is not None or self.shards.backend_name == "ray"):
            step.program.update.ready(), step.program.draw.ready()
        if profiler is not None:
            step, backend = profiler.wrap_step(step), profiler.wrap_backend(backend)
            hooks, fused = profiler.wrap_hooks(hooks), profiler.wrap_fused(fused)
        loop = Loop(step, backend, hooks, fused)
        try:
            self.shards.start()  # the workers ready before the clocks start
            trace.start()
            if progress is not None:
                progress.start()
            if signals is None or signals.signum is None:
                with self.shards.held():
                    loop.run(self.state, n)
        except KeyboardInterrupt:
            if signals is not None and signals.forced:
                raise  # the state may be torn mid-update: nothing of it is recorded
        finally:
            if progress is not None:
                progress.close()
            self.state = loop.state or self.state
            self.gradient_evaluations += trace.done * (self._points_per_step() + getattr(watch, "anchored", 0))
            self.approx.params_values = self.state.result
            if score:
                self.hist = np.concatenate([self.hist, trace.losses[:trace.done]])
