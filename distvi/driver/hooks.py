"""Hooks: everything that watches a run, outside the loop.

A hook is called as ``hook(state, info)`` after every step, in order; raising
``StopIteration`` ends the run after that step, with the state whole. The loop knows nothing
of traces, stores, MLflow, progress bars or profiles: each is a hook here (or in the layer
that owns it), built by whoever runs the loop.

Fused blocks (:mod:`distvi.driver.fused`) run many steps in one call. A hook that can see
them has ``horizon(state)``, the most steps that may pass before it must see a whole state
again (a checkpoint due, a callback's next step, a check that may end the run), and
``block(state, info)``, called once after a block with the block's per-step report
(:class:`~distvi.driver.fused.BlockInfo`) and the state at its end. With a hook that lacks
them, the run goes step by step.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol

import numpy as np

from distvi.driver.state import DriverState
from distvi.driver.step import StepInfo

CHECKPOINT_SECONDS = 60.0  # checkpoint cadence when no checkpoint_every is given
NO_LIMIT = 1 << 62  # a hook's horizon when it never needs a whole state mid-run


class Hook(Protocol):
    def __call__(self, state: DriverState, info: StepInfo) -> None: ...


class Trace:
    """Per step of a run of ``n``: loss, gradient norm, wall seconds and learning rate.

    ``done`` steps so far; the seconds of a step run from the previous hook call (or
    :meth:`start`) to this one.
    """

    def __init__(self, n: int, step0: int, scored: bool) -> None:
        self.losses, self.norms = np.empty(n), np.empty(n)
        self.seconds, self.rates = np.empty(n), np.empty(n)
        self.step0, self.scored, self.done = step0, scored, 0
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def __call__(self, state: DriverState, info: StepInfo) -> None:
        i = self.done
        self.losses[i], self.norms[i], self.rates[i] = info.loss, info.grad_norm, info.lr
        t_prev, self._t = self._t, time.perf_counter()
        self.seconds[i] = self._t - t_prev
        self.done = i + 1

    @staticmethod
    def horizon(state: DriverState) -> int:
        return NO_LIMIT

    def block(self, state: DriverState, info) -> None:
        """A block's steps at once; its wall time is shared evenly among them."""
        i, k = self.done, info.k
        self.losses[i:i + k], self.norms[i:i + k], self.rates[i:i + k] = info.losses, info.norms, info.rates
        t_prev, self._t = self._t, time.perf_counter()
        self.seconds[i:i + k] = (self._t - t_prev) / k
        self.done = i + k

    @property
    def shown(self) -> np.ndarray:
        """What a progress line shows: the loss, or the gradient norm when none is computed."""
        return self.losses if self.scored else self.norms


class DivergenceWatch:
    """Warns once (:class:`~distvi.errors.DivergenceWarning`) when the loss's running level
    climbs far above the best level the fit had reached, before anything is NaN.

    Every ``window`` steps it takes the median loss of the last window. A level above the best
    one by more than ``rise`` of the best window's spreads (median absolute deviation) and by
    more than the best level's own size is high; two high windows in a row, the second above
    the first, are a divergence. Minibatch and Monte Carlo noise move window medians by a
    fraction of a spread and a burst does not last; a decreasing loss never rises above its
    best; a diverging one climbs by orders of magnitude.
    """

    def __init__(self, trace: Trace, window: int = 25, rise: float = 20.0,
                 on_divergence=None) -> None:
        self.trace, self.window, self.rise = trace, window, rise
        # called as on_divergence(step, level, best) instead of the warning (a fit run until
        # convergence backs off instead)
        self.on_divergence = on_divergence
        self.best: tuple[float, float, int] | None = None  # level, spread, step
        self.high: float | None = None  # the last window's level, when it was high
        self.warned = False

    def horizon(self, state: DriverState) -> int:
        # a fit run until convergence stops at the step a divergence is seen: blocks end there
        if self.on_divergence is None or self.warned:
            return NO_LIMIT
        return self.window - self.trace.done % self.window

    def block(self, state: DriverState, info) -> None:
        done = self.trace.done  # the trace has seen the block
        first = done - info.k
        for end in range((first // self.window + 1) * self.window, done + 1, self.window):
            self._check(end, info.step0 + end - first, float(info.rates[end - first - 1]))

    def __call__(self, state: DriverState, info: StepInfo) -> None:
        self._check(self.trace.done, state.step, info.lr)

    def _check(self, done: int, step: int, lr: float) -> None:
        if self.warned or done % self.window:
            return
        recent = self.trace.losses[done - self.window:done]
        if not np.all(np.isfinite(recent)):
            return
        level = float(np.median(recent))
        if self.best is None or level < self.best[0]:
            self.best, self.high = (level, float(np.median(np.abs(recent - level))), step), None
            return
        best, best_spread, best_step = self.best
        if not (level - best > self.rise * best_spread and level - best > abs(best)):
            self.high = None
            return
        climbing, self.high = self.high is not None and level > self.high, level
        if climbing and self.on_divergence is not None:
            self.warned = True
            self.on_divergence(step, level, best)
        elif climbing:
            import warnings

            from distvi.errors import DivergenceWarning

            self.warned = True
            warnings.warn(
                f"the fit looks divergent: at step {step} the loss's running level is "
                f"{level:.4g} and climbing, up from {best:.4g} at step {best_step} (spread there "
                f"{best_spread:.3g}); try a smaller learning rate (this step's: {lr:.3g}) "
                "or total_grad_norm_constraint=", DivergenceWarning, stacklevel=2)


class Progress:
    """Progress every ``every`` steps with the running loss (or gradient norm when no loss is
    computed): a live tqdm bar (it/s, ETA) in a terminal, plain lines otherwise (CI, Ray Jobs
    logs), at most one every ``LINE_SECONDS``.

    ``mode``: True/"auto" (by whether stderr is a terminal), "bar", "lines".
    """

    LINE_SECONDS = 10.0

    def __init__(self, trace: Trace, n: int, mode) -> None:
        if mode not in (True, "auto", "bar", "lines"):
            raise ValueError(f"progressbar must be True, False, 'auto', 'bar' or 'lines', got {mode!r}")
        if mode in (True, "auto"):
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.trace, self.n, self.mode = trace, n, mode
        self.label = "loss" if trace.scored else "|grad|"
        self.every = max(1, min(100, n // 100))
        self.shown = 0
        self.t0 = self.t_line = time.perf_counter()
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, unit="it", smoothing=0.1)

    def start(self) -> None:
        """The clock (rate, ETA) from now: after the workers are ready."""
        self.t0 = self.t_line = time.perf_counter()
        if self.mode == "bar":
            self.bar.reset()

    def __call__(self, state: DriverState, info: StepInfo) -> None:
        done = self.trace.done
        if done % self.every == 0 or done == self.n:
            self.update(done, self.trace.shown[max(0, done - self.every):done].mean())

    @staticmethod
    def horizon(state: DriverState) -> int:
        return NO_LIMIT

    def block(self, state: DriverState, info) -> None:
        done = self.trace.done
        if done // self.every > (done - info.k) // self.every or done == self.n:
            self.update(done, self.trace.shown[max(0, done - self.every):done].mean())

    def update(self, done: int, running: float) -> None:
        if self.mode == "bar":
            self.bar.set_postfix_str(f"{self.label}={running:.4g}", refresh=False)
            self.bar.update(done - self.shown)
            self.shown = done
            return
        now = time.perf_counter()
        if now - self.t_line < self.LINE_SECONDS and done != self.n:
            return
        self.t_line = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.n - done) / rate if rate > 0 else float("inf")
        print(f"step {done}/{self.n} ({done / self.n:.0%})  {self.label}={running:.6g}  "
              f"{rate:.1f} it/s  ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.mode == "bar":
            self.bar.close()


class Callbacks:
    """The user's callbacks, ``cb(approx, losses, step)``, seeing the approximation the fit
    returns (the average, once averaging has begun); ``on_state(state)`` first makes the
    state visible to them (``inference.state``)."""

    def __init__(self, approx, callbacks, trace: Trace, on_state=None) -> None:
        self.approx, self.callbacks, self.trace, self.on_state = approx, list(callbacks), trace, on_state
        self.calls = 0
        # a callback may declare ``call_every = m``: it needs calls only at the fit's first
        # step and at steps that are multiples of m (a call at another step does nothing);
        # fused blocks then end at those steps. One without it is called at every step.
        self.every = []
        for cb in self.callbacks:
            m = getattr(cb, "call_every", None)
            self.every.append(int(m) if isinstance(m, (int, np.integer)) and m >= 1 else None)
        if None not in self.every:  # every callback says when it must run: blocks can be seen
            self.horizon, self.block = self._horizon, self._block

    def _horizon(self, state: DriverState) -> int:
        if self.calls == 0:
            return 1
        return min(m - state.step % m for m in self.every)

    def _block(self, state: DriverState, info) -> None:
        # only the callbacks due at this step (a block may also end for other reasons)
        due = [cb for cb, m in zip(self.callbacks, self.every) if self.calls == 0 or state.step % m == 0]
        if due:
            self._call(state, due)

    def __call__(self, state: DriverState, info: StepInfo) -> None:
        self._call(state, self.callbacks)

    def _call(self, state: DriverState, callbacks) -> None:
        self.calls += 1
        self.approx.params_values = state.result
        if self.on_state is not None:
            self.on_state(state)
        losses = self.trace.losses[:self.trace.done]
        for cb in callbacks:
            cb(self.approx, losses, state.step)


class Recorder:
    """Traces and checkpoints into a run store, and MLflow batches, at step boundaries.

    ``store`` is a :class:`~distvi.store.RunStore` (or None), ``tracker`` an MLflow tracking
    (or None); a checkpoint every ``checkpoint_every`` steps, or every
    :data:`CHECKPOINT_SECONDS` of wall time when none is given.
    """

    def __init__(self, store, checkpoint_every: int | None, tracker, rows_per_step: int) -> None:
        self.store, self.tracker = store, tracker
        self.ckpt_every = checkpoint_every if store is not None else None
        self.by_time = store is not None and checkpoint_every is None
        self.next_ckpt_time = time.monotonic() + CHECKPOINT_SECONDS
        self.log_every = tracker.log_every if tracker is not None else None
        self.rows_per_step = rows_per_step
        self.trace: Trace | None = None
        self.written, self.logged = 0, 0
        self.last_ckpt_step = None
        self.local_states = lambda: None  # the workers' local variables, where they hold them

    def bind(self, trace: Trace) -> Recorder:
        self.trace, self.written, self.logged = trace, 0, 0
        return self

    def horizon(self, state: DriverState) -> int:
        """Blocks end at the steps a log or a checkpoint is due (a checkpoint by wall time
        waits for the end of the block, at most ``BLOCK_SECONDS`` later)."""
        h = NO_LIMIT
        for every in (self.log_every, self.ckpt_every):
            if every is not None:
                h = min(h, every - state.step % every)
        return h

    def block(self, state: DriverState, info) -> None:
        self(state, None)

    def __call__(self, state: DriverState, info: StepInfo) -> None:
        step, done = state.step, self.trace.done
        if self.log_every is not None and step % self.log_every == 0:
            self._log(done)
        if ((self.ckpt_every is not None and step % self.ckpt_every == 0)
                or (self.by_time and time.monotonic() >= self.next_ckpt_time)):
            self.next_ckpt_time = time.monotonic() + CHECKPOINT_SECONDS
            self._write(done)
            save_checkpoint(self.store, state, self.local_states())
            self.last_ckpt_step = step

    def _rows(self, lo: int, hi: int):
        t = self.trace
        steps = np.arange(t.step0 + lo + 1, t.step0 + hi + 1)
        loss = t.losses[lo:hi] if t.scored else np.full(hi - lo, np.nan)
        sec = t.seconds[lo:hi]
        return steps, loss, t.norms[lo:hi], sec, t.rates[lo:hi], self.rows_per_step / np.maximum(sec, 1e-12)

    def _log(self, done: int) -> None:
        if self.tracker is None or done <= self.logged:
            return
        steps, loss, norm, sec, lr, _ = self._rows(self.logged, done)
        window = {"grad_norm": float(norm.mean()), "step_seconds": float(sec.mean()),
                  "rows_per_s": float(self.rows_per_step / max(float(sec.mean()), 1e-12)),
                  "learning_rate": float(lr[-1])}
        if self.trace.scored:
            window["loss_running"] = float(np.mean(loss))
        self.tracker.log_steps(steps, loss if self.trace.scored else None, window)
        self.logged = done

    def _write(self, done: int) -> None:
        if done > self.written:
            steps, loss, norm, sec, lr, rows = self._rows(self.written, done)
            self.store.append(steps, loss=loss, grad_norm=norm, step_seconds=sec,
                              learning_rate=lr, rows_per_s=rows)
            self.written = done

    def close(self, state: DriverState | None) -> None:
        """At the end (or on an error): the remaining traces and a checkpoint of the last
        good state."""
        if self.trace is None or state is None:
            return
        done = state.step - self.trace.step0
        self._log(done)
        if self.store is not None:
            self._write(done)
            if self.last_ckpt_step != state.step:
                save_checkpoint(self.store, state, self.local_states())
            self.store.flush()


def save_checkpoint(store, state: DriverState, local_states=None) -> None:
    """``state`` into a run store's next checkpoint (the store takes plain arrays), with the
    workers' ``local_states`` where they hold local variables."""
    store.checkpoint(state.params, state.opt_state.flat, state.step, state.opt_step,
                     state.draw_position, state.average, state.n_averaged, local_states)
