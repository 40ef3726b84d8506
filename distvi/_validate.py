"""Argument checks shared by every module: what an int, a number, a count of steps is.

A bool is not an int here (``True`` is refused where a count is expected); numpy integers
and floats are accepted where Python's are.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

MAX_STEPS = 10**9  # steps per fit call (a run continues past it with resume/refine)


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return None
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def steps(value: Any, name: str = "n") -> int:
    """A number of steps: an int in [0, MAX_STEPS]."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_STEPS:  # the loop keeps a float per step for each trace
        raise ValueError(f"{name} must be <= {MAX_STEPS:.0e} steps per fit, got {value}")
    return int(value)


def average_from(value: Any, n: int) -> int | None:
    """Steps of a fit of ``n`` before averaging starts, from ``average_from`` (None: no
    averaging): a float in [0, 1) is a fraction of ``n``, an int a number of steps."""
    if value is None:
        return None
    if not is_real(value):
        raise TypeError(f"average_from must be a fraction of n (float) or a number of steps (int), "
                        f"got {type(value).__name__}")
    if not is_int(value):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"average_from as a fraction of n must be in [0, 1), got {value}")
        return int(round(float(value) * n))
    if not 0 <= value < max(n, 1):
        raise ValueError(f"average_from as a number of steps must be in [0, n={n}), got {value}")
    return int(value)


BACKEND_OPTIONS = ("num_cpus", "max_restarts", "restart_window", "timeout_s",
                   "placement_timeout_s", "startup_timeout_s", "actor_class", "path", "fused")


def backend_options(options: dict | None) -> dict:
    """The Ray backend's options, each checked."""
    options = dict(options or {})
    unknown = set(options) - set(BACKEND_OPTIONS)
    if unknown:
        raise TypeError(f"unknown backend_options {sorted(unknown)}")
    for key in ("num_cpus", "timeout_s", "placement_timeout_s", "startup_timeout_s"):
        if key in options and not (is_real(options[key]) and options[key] > 0):
            raise ValueError(f"backend_options[{key!r}] must be a number > 0, got {options[key]!r}")
    if "max_restarts" in options and not (is_int(options["max_restarts"])
                                          and options["max_restarts"] >= 0):
        raise ValueError(f"backend_options['max_restarts'] must be an int >= 0, got {options['max_restarts']!r}")
    if "restart_window" in options and not (is_int(options["restart_window"])
                                            and options["restart_window"] >= 1):
        raise ValueError(f"backend_options['restart_window'] must be an int >= 1 (steps), "
                         f"got {options['restart_window']!r}")
    if not isinstance(options.get("fused", True), bool):
        raise ValueError(f"backend_options['fused'] must be True or False, got {options['fused']!r}")
    if options.get("path", "auto") not in ("auto", "direct", "compiled", "plain"):
        raise ValueError(f"backend_options['path'] must be 'auto', 'direct', 'compiled' or 'plain', "
                         f"got {options['path']!r}")
    return options


UNSUPPORTED_FIT_KEYWORDS = ("tf_n_mc", "test_optimizer", "more_obj_params", "more_tf_params",
                            "more_updates", "more_replacements", "fn_kwargs")


def no_fit_keywords(kwargs: dict, method: str) -> None:
    """Refuse keywords ``fit()`` does not take, naming PyMC's that distvi does not support."""
    for key in kwargs:
        if key in UNSUPPORTED_FIT_KEYWORDS:
            raise TypeError(f"fit() keyword {key!r} is not supported by distvi's {method}")
        raise TypeError(f"fit() got an unexpected keyword argument {key!r}")


def max_norm(value: Any) -> float | None:
    """``total_grad_norm_constraint``: None, or a finite number > 0."""
    if value is None:
        return None
    norm = float(value)
    if not norm > 0 or not np.isfinite(norm):
        raise ValueError(f"total_grad_norm_constraint must be > 0, got {value}")
    return norm
