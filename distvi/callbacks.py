"""Callbacks called as ``cb(approx, losses, i)`` after every step, as in PyMC.

A callback ends a fit cleanly by raising ``StopIteration``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np


def _n_params(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 3
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in sig.parameters.values())


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _flat_params(approx) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in approx.params_values])


class CheckParametersConvergence:
    """Stop when the variational parameters change by less than ``tolerance``.

    Every ``every`` steps the flat parameter vector is compared with the one seen last time:
    ``diff='absolute'`` uses ``norm(new - old, ord)``, ``diff='relative'`` divides each change
    by the old value first (PyMC's definition).
    """

    def __init__(self, every: int = 100, tolerance: float = 1e-3, diff: str = "relative",
                 ord: float = np.inf) -> None:
        if diff not in ("relative", "absolute"):
            raise ValueError(f"diff must be 'relative' or 'absolute', got {diff!r}")
        if every < 1 or not tolerance > 0:
            raise ValueError("every must be >= 1 and tolerance > 0")
        self.every, self.tolerance, self.diff, self.ord = int(every), float(tolerance), diff, ord
        self.prev: np.ndarray | None = None
        self.converged_at: int | None = None

    def __call__(self, approx, losses, i: int) -> None:
        if self.prev is None:
            self.prev = _flat_params(approx)
            return
        if i % self.every:
            return
        current = _flat_params(approx)
        delta = current - self.prev
        if self.diff == "relative":
            delta = delta / (np.abs(self.prev) + 1e-10)
        self.prev = current
        if np.linalg.norm(delta, self.ord) < self.tolerance:
            self.converged_at = i
            raise StopIteration(f"parameters converged at step {i}")


class CheckLossConvergence:
    """Stop when the running mean of the loss stops changing.

    Every ``every`` steps (default ``window // 10``), once ``2 * window`` losses of this fit are
    in, the mean of the last ``window`` losses is compared with the mean of the ``window``
    before them; the fit stops when they differ by less than ``tolerance`` relative to the
    older mean. A loss that keeps falling, or one that keeps growing (a diverging fit), moves
    its running mean and is left alone. ``stopped_at`` is the step the fit stopped at (None
    while it runs on) and ``changes`` the (step, relative change) of every comparison.
    """

    def __init__(self, window: int = 1000, tolerance: float = 1e-3, every: int | None = None) -> None:
        _count("window", window)
        if every is not None:
            _count("every", every)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not tolerance > 0:
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
        self.window, self.tolerance = int(window), float(tolerance)
        self.every = max(1, self.window // 10) if every is None else int(every)
        self.stopped_at: int | None = None
        self.changes: list[tuple[int, float]] = []

    def __call__(self, approx, losses, i: int) -> None:
        w = self.window
        if len(losses) < 2 * w or i % self.every:
            return
        recent, before = losses[-w:], losses[-2 * w:-w]
        if not (np.all(np.isfinite(recent)) and np.all(np.isfinite(before))):
            if np.isnan(recent).all():
                raise ValueError("CheckLossConvergence needs the loss: this fit does not compute "
                                 "it (fit(..., score=True))")
            return  # a non-finite loss is not convergence
        old, new = float(np.mean(before)), float(np.mean(recent))
        change = abs(new - old) / max(abs(old), np.finfo(float).tiny)
        self.changes.append((i, change))
        if change < self.tolerance:
            self.stopped_at = i
            raise StopIteration(f"the running mean of the loss changed by {change:.2e} "
                                f"(< {self.tolerance:g}) at step {i}")


class Tracker:
    """Record values every step: ``Tracker(mean=lambda: approx.mean.copy())``.

    Each keyword is a callable, called as ``f()`` when it takes no arguments and as
    ``f(approx, losses, i)`` otherwise. Records are kept in ``tracker.hist[name]`` (and ``tracker[name]``).
    """

    def __init__(self, **fns: Callable[..., Any]) -> None:
        self.fns = fns
        self._arity = {k: _n_params(f) for k, f in fns.items()}
        self.hist: dict[str, list] = {k: [] for k in fns}

    def __call__(self, approx, losses, i: int) -> None:
        for name, fn in self.fns.items():
            value = fn() if self._arity[name] == 0 else fn(approx, losses, i)
            self.hist[name].append(value)

    def __getitem__(self, name: str) -> list:
        return self.hist[name]
