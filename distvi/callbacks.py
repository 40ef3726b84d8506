"""Callbacks called as ``cb(approx, losses, i)`` after every step, as in PyMC.

A callback may declare ``call_every = m``: it needs calls only at the fit's first step and at
steps that are multiples of ``m``. Fits in fused blocks then call it only there (blocks end
at those steps); with one that lacks it, the fit runs step by step. The two convergence
checks here declare it.

A callback ends a fit cleanly by raising ``StopIteration``.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from distvi._validate import is_int, is_real


def _count(name: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _flat_params(approx) -> np.ndarray:
    """The approximation's parameters as one flat vector, read through PyMC's interface
    (``approx.params``, shared variables, and their ``get_value()``): any PyMC-shaped
    approximation will do, PyMC's own included."""
    return np.concatenate([np.ravel(p.get_value()) for p in approx.params])


class CheckParametersConvergence:
    """Stop when the variational parameters change by less than ``tolerance``, by PyMC's rule.

    The first call keeps the flat parameter vector; after that, at every step ``i`` that is a
    multiple of ``every`` (and not below it), the vector is compared with the one kept last
    time and replaces it. ``diff='absolute'`` compares ``norm(|new - old|, ord)``,
    ``diff='relative'`` ``norm((|new - old| + 1e-6) / (|old| + 1e-6), ord)`` (PyMC's
    definitions, its ``eps`` included: a parameter that stays at 0 counts as a relative
    change of 1). ``converged_at`` is the step it stopped the fit at (None while it runs on).

    The parameters are read as PyMC's callbacks read them, ``p.get_value()`` for each ``p``
    in ``approx.params``, so this works in ``pymc.fit`` too.
    """

    EPS = 1e-6  # PyMC's eps in its relative difference

    def __init__(self, every: int = 100, tolerance: float = 1e-3, diff: str = "relative",
                 ord: float = np.inf) -> None:
        if diff not in ("relative", "absolute"):
            raise ValueError(f"diff must be 'relative' or 'absolute', got {diff!r}")
        _count("every", every)
        if not is_real(tolerance) or not tolerance > 0:
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
        self.every, self.tolerance, self.diff, self.ord = int(every), float(tolerance), diff, ord
        self.call_every = self.every  # called at the first step and every multiple: fused blocks end there
        self.prev: np.ndarray | None = None
        self.converged_at: int | None = None

    def __call__(self, approx, losses, i: int) -> None:
        if self.prev is None:
            self.prev = _flat_params(approx)
            return
        if i % self.every or i < self.every:
            return
        current = _flat_params(approx)
        change = np.abs(current - self.prev)
        if self.diff == "relative":
            change = (change + self.EPS) / (np.abs(self.prev) + self.EPS)
        self.prev = current
        if np.linalg.norm(change, self.ord) < self.tolerance:
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
        if not is_real(tolerance) or not tolerance > 0:
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
        self.window, self.tolerance = int(window), float(tolerance)
        self.every = max(1, self.window // 10) if every is None else int(every)
        self.call_every = self.every  # it acts at multiples of every only
        self.stopped_at: int | None = None
        self.changes: list[tuple[int, float]] = []

    def __call__(self, approx, losses, i: int) -> None:
        w = self.window
        if len(losses) < 2 * w or i % self.every:
            return
        losses = np.asarray(losses, dtype="float64")  # PyMC passes an array, a list will do
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


def _call_form(name: str, fn: Any) -> str:
    """How ``Tracker`` calls ``fn``: ``"none"`` (``fn()``), ``"full"`` (``fn(approx, hist, i)``),
    or ``"try"`` when it has no signature to tell (PyMC's order: ``fn()``, then the other)."""
    if not callable(fn):
        raise TypeError(f"Tracker({name}=...) needs a callable, got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and extension callables
        return "try"
    params = list(sig.parameters.values())
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_POSITIONAL for p in params) and not required:
        # ``lambda *t: ...`` takes both calls: PyMC's order, fn() first, then fn(approx, hist, i)
        return "varargs"
    for form, args in (("none", ()), ("full", (None, None, None))):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return form
    raise TypeError(f"Tracker({name}=...) must take no arguments or (approx, hist, i); "
                    f"its signature is {sig}")


class Tracker:
    """Record values every step: ``Tracker(mean=lambda: approx.mean.copy())``.

    Each keyword is a callable, called as PyMC's ``Tracker`` calls it: ``f()`` when it can be
    called without arguments (``lambda *t: ...`` included), else ``f(approx, hist, i)``. Which
    one is decided from the signature, once, so a ``TypeError`` raised inside ``f`` is not
    mistaken for the wrong call; a callable that takes neither is refused (``TypeError``
    naming its key). Only a callable without a signature is tried both ways, ``f()`` first.
    Records are kept in ``tracker.hist[name]`` (and ``tracker[name]``); ``clear()`` empties them.
    """

    def __init__(self, **fns: Callable[..., Any]) -> None:
        self._forms = {k: _call_form(k, f) for k, f in fns.items()}
        self.fns = fns
        self.hist: collections.defaultdict[str, list] = collections.defaultdict(list)
        self.clear()

    def __call__(self, approx, losses, i: int) -> None:
        for name, fn in self.fns.items():
            form = self._forms[name]
            if form == "none":
                value = fn()
            elif form == "full":
                value = fn(approx, losses, i)
            elif form == "varargs":
                try:
                    value = fn()
                except Exception:  # e.g. ``lambda *t: t[-1]``: it wants the arguments
                    value = fn(approx, losses, i)
            else:
                try:
                    value = fn()
                except TypeError:
                    try:
                        value = fn(approx, losses, i)
                    except TypeError as err:
                        raise TypeError(f"Tracker({name}=...) could be called neither as f() nor "
                                        f"as f(approx, hist, i): {err}") from err
            self.hist[name].append(value)

    record = __call__  # PyMC's name

    def clear(self) -> None:
        """Forget every record."""
        self.hist = collections.defaultdict(list, {k: [] for k in self.fns})

    def __getitem__(self, name: str) -> list:
        return self.hist[name]
