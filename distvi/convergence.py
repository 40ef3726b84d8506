"""Fits that run until they converge (``fit(n=None)``): phases of stationary iterates,
averaged, with the learning rate halved between them.

The idea is RAABBVI's (Welandawe, Andersen, Vehtari and Huggins, 2022): at a fixed learning
rate the iterates settle into a stationary cloud around a point the rate biases a little;
averaging the cloud removes the minibatch and Monte Carlo noise, and halving the rate removes
the bias. Here:

- **Scales.** Each phase's learning rate is relative: the optimizer's change of every
  coordinate is multiplied by that coordinate's scale in q at the phase's start (a mean's
  posterior sd — for a full-rank group its conditional sd given the others, the inverse
  precision diagonal's root; an off-diagonal Cholesky entry that of its row over the root
  of the row's length; 1 for the log-scale parameters), so a rate means the same on data
  of any size and on variables of any spread. A full-rank group's mean steps in q's
  whitened coordinates instead (the optimizer sees ``L' g``, its change is mapped back by
  ``L``, q's Cholesky factor at the phase's start), so correlated coordinates move together.
- **Minibatches.** On minibatches each phase anchors a control variate at q's mean (see
  :mod:`distvi.backends.anchored`: the step's minibatch estimate there is subtracted, the
  exact full-data value added), which takes most of the minibatch noise out near the
  posterior, at one full-data pass a phase and one point more a step.
- **Stationarity.** The phase's iterates are summed in blocks (their size doubling so at
  most :data:`MAX_BLOCKS` are kept). The last half of the phase is split in two; it is
  stationary when, for every coordinate, the two halves' means differ by less than a
  Bonferroni bound on their noise (a z statistic from the block means), or by less than
  :data:`NEGLIGIBLE` of the coordinate's scale.
- **Phases.** A stationary phase's last half is averaged; the fit restarts from that average
  at half the learning rate, with a fresh optimizer state. It has converged when two
  successive phases' averages give q means within ``tol`` posterior sds and sds within
  ``tol`` relative (default 0.02), up to twice their Monte Carlo error (the spread of the
  averaged half's parts), and that error is itself below ``tol``.
- **Draws.** A phase whose average has its own Monte Carlo error above ``tol / 2`` doubles
  q's draws a step for the next phases (at most :data:`MAX_DRAWS`): for a coordinate whose
  gradient is mostly noise, the error of a phase's average depends on its steps and draws,
  not on the rate (a smaller rate shrinks the cloud but slows its mixing as much).
- **Divergence.** A non-finite step, a loss climbing far above its running level (the
  :class:`~distvi.driver.hooks.DivergenceWatch` rule), a stationary average whose full-data
  loss is far above the lowest seen, or (from a start near the answer) a running loss far
  below it — a density gone wrong at runaway parameters — restarts from the last good
  average (or the start) at a quarter of the rate; after :data:`MAX_BACKOFFS` such restarts
  the fit gives up with a :class:`~distvi.errors.ConvergenceWarning`. A fit that stops
  without converging (``max_n``, divergence) returns the last good average, not the last
  iterate.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.special import ndtri

from distvi import _validate, optimizers
from distvi.errors import ConvergenceWarning, NotFiniteError
from distvi.phase_stats import (change, far_above, full_loss, moments, phase_moments, step_scales,
                                whitening)

MAX_N = 100_000       # steps at most when n=None
TOL = 0.02            # successive phases agree within this (sd units / relative sd)
LEARNING_RATE = 0.1   # the first phase's relative rate when no optimizer is given
MAX_BLOCKS = 64       # block sums kept per phase
BLOCK = 5             # steps in a block at a phase's start
MIN_BLOCKS = 32       # blocks a phase has before its stationarity is tested
TURNS = 5             # a phase lasts at least this over its rate: time to move 5 scales
MONITORED = 2000      # coordinates tested for stationarity at most
NEGLIGIBLE = 0.05     # a drift this small against a coordinate's scale is stationary
MAX_BACKOFFS = 8      # divergence restarts before the fit gives up
MAX_DRAWS = 32        # q's draws a step at most, when a phase's own error asks for more
BACKOFF = 0.25        # the rate after a divergence, relative to the one that diverged


@dataclass
class Phase:
    """One phase of a fit run until convergence."""

    learning_rate: float
    start_step: int
    end_step: int
    outcome: str          # "stationary", "diverged", "not finite", "max_n", "stopped"
    change: float = float("nan")  # against the previous phase's average (NaN: the first)
    noise: float = float("nan")   # the Monte Carlo error of that change, at most
    draws: int = 1                # points of q a step (draws; an SVGD's particles)


@dataclass
class Convergence:
    """Why a fit run with ``n=None`` stopped: ``converged`` (successive phases agreed within
    ``tol``), the ``reason`` (``"converged"``, ``"max_n"``, ``"diverged"``, ``"stopped"``
    by a callback or a signal), the ``step`` it stopped at, its ``phases``, and the gradient
    evaluations (points at which the model's gradient was taken, minibatch or full-data)."""

    tol: float
    max_n: int
    converged: bool = False
    reason: str = ""
    step: int = 0
    phases: list[Phase] = field(default_factory=list)
    backoffs: int = 0
    gradient_evaluations: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def check_tol(tol) -> float:
    if not _validate.is_real(tol) or not 0 < float(tol) < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    return float(tol)


def check_until(n, max_n, tol, average_from, resume, optimizer) -> tuple[int, tuple | None]:
    """The steps a fit runs at most and, for ``n=None`` (or ``"auto"``), its ``(max_n,
    tol)``; every setting that does not go with it refused before any work."""
    if n is not None and not (isinstance(n, str) and n == "auto"):
        if max_n is not None or tol is not None:
            raise TypeError("max_n= and tol= apply to a fit run until it converges: give "
                            "n=None (or drop them)")
        return _validate.steps(n), None
    max_n = _validate.steps(MAX_N if max_n is None else max_n, "max_n")
    if max_n < 1:
        raise ValueError("max_n must be >= 1")
    tol = check_tol(TOL if tol is None else tol)
    if average_from is not None:
        raise ValueError("average_from is for a fixed n: a fit with n=None averages each "
                         "of its phases itself")
    if resume:
        raise ValueError("resume=True needs a fixed n: a fit with n=None is not "
                         "checkpointed phase by phase; give the run's n")
    if optimizer is not None and callable(optimizers.as_optimizer(optimizer).hyper["learning_rate"]):
        raise ValueError("a learning-rate schedule and n=None both set the rate: with "
                         "n=None give a constant learning rate (the first phase's)")
    return max_n, (max_n, tol)


# ------------------------------------------------------------------ one phase
class _Blocks:
    """Sums of consecutive iterates in blocks of ``size`` steps, at most :data:`MAX_BLOCKS`
    (two neighbours merge, the size doubles)."""

    def __init__(self) -> None:
        self.size, self.sums, self.current, self.count = BLOCK, [], None, 0

    def add(self, flat: np.ndarray) -> bool:
        """Add one iterate; True when it completed a block."""
        if self.current is None:
            self.current = flat.copy()
        else:
            self.current += flat
        self.count += 1
        if self.count < self.size:
            return False
        self.sums.append(self.current)
        self.current, self.count = None, 0
        if len(self.sums) == MAX_BLOCKS:
            self.sums = [a + b for a, b in zip(self.sums[::2], self.sums[1::2])]
            self.size *= 2
        return True

    def last_half(self) -> np.ndarray:
        """The block means of the last half (an even number of blocks), oldest first."""
        h = len(self.sums) // 2
        h -= h % 2
        return np.stack(self.sums[-h:]) / self.size


class PhaseWatch:
    """A hook: stops the loop (``StopIteration``) when the phase's iterates are stationary
    (``outcome = "stationary"``) or the loss diverges (``"diverged"``)."""

    def __init__(self, scales: tuple[np.ndarray, ...], rate: float = LEARNING_RATE,
                 floor: float = -np.inf, anchor: tuple | None = None,
                 maps: dict[int, np.ndarray] | None = None) -> None:
        self.floor, self.trace = floor, None  # a running loss below floor: a runaway
        # the phase's per-coordinate rate scales, the parameters that step in whitened
        # coordinates instead (position -> matrix), and its control variate's anchor:
        # (point, full-data log-likelihood, gradient) or None
        self.scales, self.maps, self.anchor = scales, dict(maps or {}), anchor
        self.anchored = int(anchor is not None)  # points a step evaluates beyond q's
        self.min_steps = max(MIN_BLOCKS * BLOCK, int(np.ceil(TURNS / rate)))
        flat = np.concatenate([np.ravel(s) for s in scales]) if scales else np.zeros(0)
        self.monitor = (np.arange(flat.size) if flat.size <= MONITORED else
                        np.unique(np.linspace(0, flat.size - 1, MONITORED).astype(int)))
        self.scale = flat[self.monitor]
        self.fine, self.all = _Blocks(), _Blocks()
        self.outcome: str | None = None
        self.steps = 0

    def __call__(self, state, info) -> None:
        if self.outcome is not None:  # a divergence, seen by the watch before this hook
            raise StopIteration
        self._see(np.concatenate([np.ravel(p) for p in state.params]))

    def horizon(self, state) -> int:
        """Fused blocks end where this watch may stop the phase: a completed block."""
        return 1 if self.outcome is not None else self.fine.size - self.fine.count

    def block(self, state, info) -> None:
        if self.outcome is not None:
            raise StopIteration
        for flat in info.iterates:  # the block ends at a completed block (its horizon)
            self._see(flat)

    def _see(self, flat: np.ndarray) -> None:
        self.steps += 1
        self.all.add(flat)
        if not self.fine.add(flat[self.monitor]):
            return
        if self.below_floor():
            self.outcome = "diverged"
            raise StopIteration
        if self.steps >= self.min_steps and len(self.fine.sums) >= MIN_BLOCKS and self.stationary():
            self.outcome = "stationary"
            raise StopIteration

    def program_scales(self) -> tuple[np.ndarray, ...]:
        """What the scaled step takes per parameter: its scales, or its whitening matrix."""
        return tuple(self.maps.get(i, s) for i, s in enumerate(self.scales))

    def backend(self, backend):
        """The fit's backend for this phase: with the control variate when anchored."""
        if self.anchor is None:
            return backend
        from distvi.backends.anchored import AnchoredBackend

        return AnchoredBackend(backend, *self.anchor)

    def below_floor(self) -> bool:
        t = self.trace
        if t is None or not t.scored or self.floor == -np.inf or t.done < 25:
            return False
        return bool(np.median(t.losses[t.done - 25:t.done]) < self.floor)

    def diverged(self, step, level, best) -> None:
        """What :class:`~distvi.driver.hooks.DivergenceWatch` calls instead of warning."""
        self.outcome = "diverged"

    def stationary(self) -> bool:
        means = self.fine.last_half()
        a, b = np.split(means, 2)
        n = a.shape[0]
        drift = np.abs(b.mean(axis=0) - a.mean(axis=0))
        noise = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / n)
        bound = -ndtri(0.025 / max(len(self.scale), 1))  # two-sided 5 %, Bonferroni
        ok = (drift <= bound * noise) | (drift <= NEGLIGIBLE * self.scale)
        return bool(np.all(ok))

    def average(self, shapes, groups: int = 1) -> list:
        """The mean of the phase's last half, as parameter arrays; with ``groups`` > 1, the
        means of that many consecutive parts of it (for its Monte Carlo error)."""
        parts = np.array_split(self.all.last_half(), groups)
        out = []
        for part in parts:
            mean, arrays, i = part.mean(axis=0), [], 0
            for s in shapes:
                size = int(np.prod(s))
                arrays.append(mean[i:i + size].reshape(s))
                i += size
            out.append(arrays)
        return out[0] if groups == 1 else out


# ------------------------------------------------------------------ the phases
def run_until_converged(inference, max_n: int, tol: float, run_phase) -> Convergence:
    """Phases of ``inference`` from its state until converged, ``max_n`` steps, a stop, or
    too many divergences. ``run_phase(remaining, watch)`` runs the loop (raising
    :class:`NotFiniteError` as a fit does). The state ends at the last good average."""
    conv = Convergence(tol, max_n)
    base, base_draws = inference._optimizer, inference._n_mc
    rate, draws = float(base.hyper["learning_rate"]), base_draws
    first = inference.state.step
    shapes = [np.shape(p) for p in inference.state.params]
    good = [np.array(p) for p in inference.state.params]  # where a divergence restarts
    before = None  # the last phase's moments
    reference = full_loss(inference, good, 0)  # the lowest full-data loss seen: the start's
    # a start near the answer (or an accepted phase) is near the lowest loss there is: a
    # running loss far below it is a density gone wrong at runaway parameters
    trusted = inference.start_report is not None and inference.start_report.method == "map"
    shards = inference.shards
    minibatched = shards.has_data and shards.rows_per_step < shards.source.n_rows
    watch = None
    while True:
        step0 = inference.state.step
        remaining = max_n - (step0 - first)
        if remaining <= 0:
            conv.reason = "max_n"
            break
        scales = step_scales(inference.approx, inference.state.params)
        inference._optimizer = optimizers.Optimizer(base.name, {**base.hyper, "learning_rate": rate})
        inference._n_mc = draws
        floor = reference[0] - max(0.5 * abs(reference[0]), 10.0) if trusted else -np.inf
        anchor = _anchor(inference) if minibatched else None
        watch = PhaseWatch(scales, rate, floor, anchor,
                           whitening(inference.approx, inference.state.params))
        try:
            run_phase(remaining, watch)
            outcome = watch.outcome
        except NotFiniteError:
            outcome = "not finite"
        end = inference.state.step
        conv.gradient_evaluations += (end - step0) * (inference._points_per_step() + watch.anchored) \
            + watch.anchored  # the anchor's full-data gradient
        phase = Phase(rate, step0, end, outcome or ("max_n" if end - first >= max_n else "stopped"),
                      draws=inference._points_per_step())
        conv.phases.append(phase)
        if outcome == "stationary":
            average = watch.average(shapes)
            level = full_loss(inference, average, len(conv.phases))
            if level[0] == np.inf or far_above(level, reference):
                outcome = phase.outcome = "diverged"  # settled, but far above where it was
            elif level[0] < reference[0]:
                reference = level
        if outcome in ("diverged", "not finite"):
            conv.backoffs += 1
            if conv.backoffs > MAX_BACKOFFS:
                conv.reason = "diverged"
                break
            rate *= BACKOFF
            inference.state = inference._fresh_state_at(good)
            continue
        if outcome is None:
            conv.reason = phase.outcome
            break
        after = phase_moments(inference.approx, watch, shapes, average)
        # a fresh optimizer: second moments remembered from a noisier phase would shrink the
        # next phase's steps, and a phase that barely moves looks converged
        inference.state = inference._fresh_state_at(average)
        good, trusted = average, True
        if before is not None:
            phase.change, beyond_noise, phase.noise = change(before, after)
            if beyond_noise < tol and phase.noise < tol:
                conv.converged, conv.reason = True, "converged"
                break
        before = after
        rate *= 0.5
        if inference.draws_adapt and own_error(after) > tol / 2:
            # the average's own Monte Carlo error would keep the next comparison above
            # tol: a smaller rate does not lower it, more draws of q a step do (the part of
            # it that is q's; a minibatch's part the control variate takes)
            draws = min(2 * draws, max(MAX_DRAWS, base_draws))
    inference._optimizer, inference._n_mc = base, base_draws
    if conv.reason in ("max_n", "diverged"):
        inference.state = inference.state._replace(
            params=tuple(_last_good(inference, watch, shapes, good, reference, len(conv.phases))))
    conv.step = inference.state.step
    if not conv.converged and conv.reason != "stopped":
        _warn_not_converged(conv, inference.start_report)
    return conv


def own_error(moments) -> float:
    """A phase average's largest Monte Carlo error: of a mean, in sds; of an sd, relative."""
    m, sd, se_m, se_s = moments
    return float(np.max(np.concatenate([se_m / sd, se_s / sd]))) if sd.size else 0.0


def _anchor(inference) -> tuple:
    """A control variate's anchor at q's mean: the point and its full-data log-likelihood
    and gradient (one pass of the workers over their whole shards)."""
    mean = moments(inference.approx, inference.state.params)[0]
    logp, grad = inference.shards.logp_and_grad(mean[None, :])
    return mean, float(logp[0]), grad[0]


def _last_good(inference, watch, shapes, good, reference, phase: int) -> list[np.ndarray]:
    """What an unconverged fit returns: the unfinished phase's average when it has blocks
    enough and a loss no worse than the best, else the last accepted average."""
    if watch is None or watch.outcome is not None or len(watch.all.sums) < 8:
        return good
    average = watch.average(shapes)
    level = full_loss(inference, average, phase + 1)
    return good if level[0] == np.inf or far_above(level, reference) else average


def _warn_not_converged(conv: Convergence, start_report) -> None:
    changes = [p.change for p in conv.phases if np.isfinite(p.change)]
    last = f"{changes[-1]:.3g}" if changes else "none yet"
    what = (f"reached max_n={conv.max_n} steps" if conv.reason == "max_n" else
            f"diverged {conv.backoffs} times, each time restarted at a smaller learning rate")
    tips = ["a larger max_n", "a larger batch_size (minibatch noise sets how closely phases "
            "can agree)", "a smaller learning rate"]
    if start_report is None:
        tips.append("start='map'")
    warnings.warn(
        f"the fit did not converge: it {what} (last change between phases {last}, tolerance "
        f"{conv.tol:g}); the approximation is the last good average. Try " + ", ".join(tips),
        ConvergenceWarning, stacklevel=5)
