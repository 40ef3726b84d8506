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
