"""Stochastic optimizers, each written once as a pure symbolic update rule.

A rule maps ``(params, grads, state, learning_rate)`` to ``(new_params, new_state)``
over plain pytensor variables. Two front ends share it: PyMC's update API, which
returns an ``OrderedDict`` of updates over shared variables, and the driver's compiled
step, which takes params, optimizer state and learning rate as explicit inputs and
returns their new values. The formulas match ``pymc.variational.updates`` (5.28.5).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.compile import SharedVariable
from pytensor.tensor.variable import TensorVariable

from distvi.errors import NotFiniteError
from distvi._validate import is_int, is_real

__all__ = [
    "LearningRate",
    "OptState",
    "Optimizer",
    "adadelta",
    "adagrad",
    "adagrad_window",
    "adam",
    "adamax",
    "apply_momentum",
    "apply_nesterov_momentum",
    "momentum",
    "nesterov_momentum",
    "norm_constraint",
    "rmsprop",
    "sgd",
    "total_norm_constraint",
]

LearningRate: TypeAlias = float | Callable[[int], float]
Updates: TypeAlias = "OrderedDict[SharedVariable, TensorVariable]"
LossOrGrads: TypeAlias = "TensorVariable | Sequence[TensorVariable] | None"
Params: TypeAlias = "Sequence[SharedVariable] | None"


# --- hyperparameter validation ---------------------------------------------------------


def _real(name: str, value: Any) -> float:
    if not is_real(value):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    if not math.isfinite(value):  # a FloatingPointError too, as PyMC's NaN errors are
        raise NotFiniteError(f"`{name}` must be finite, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    if _real(name, value) <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return float(value)


def _learning_rate(name: str, value: Any) -> None:
    if not callable(value):
        _positive(name, value)


def _fraction(name: str, value: Any) -> None:  # 0 <= value < 1
    if not 0 <= _real(name, value) < 1:
        raise ValueError(f"`{name}` must satisfy 0 <= {name} < 1, got {value!r}")


def _open_fraction(name: str, value: Any) -> None:  # 0 < value < 1
    if not 0 < _real(name, value) < 1:
        raise ValueError(f"`{name}` must satisfy 0 < {name} < 1, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value!r}")


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "learning_rate": _learning_rate,
    "epsilon": _positive,
    "momentum": _fraction,
    "rho": _open_fraction,
    "beta1": _fraction,
    "beta2": _fraction,
    "n_win": _positive_int,
}


# --- the rules -------------------------------------------------------------------------
# A rule is split in two so that scalar counters (adam's t, adagrad_window's i) are
# advanced once for all params: ``advance(counters, lr, hyper) -> (new_counters, ctx)``
# then ``per_param(param, grad, slots, ctx, hyper) -> (new_param, new_slots)``.


@dataclass(frozen=True)
class _Rule:
    hyper_names: tuple[str, ...]
    per_param: Callable[..., tuple[Any, tuple[Any, ...]]]
    n_slots: int = 0
    n_counters: int = 0
    advance: Callable[..., tuple[list[Any], Any]] = lambda counters, lr, h: ([], lr)
    slot_shape: Callable[[tuple, Mapping[str, Any]], tuple] = lambda shape, h: tuple(shape)


def _sgd_step(param, grad, lr):
    return param - lr * grad


def _momentum_step(param, stepped, velocity, mu):
    """Heavy-ball momentum on top of an already computed update ``stepped``."""
    moved = mu * velocity + stepped
    return moved, moved - param


def _nesterov_step(param, stepped, velocity, mu):
    """Nesterov momentum on top of an already computed update ``stepped``."""
    moved = mu * velocity + stepped - param
    return mu * moved + stepped, moved


def _sgd(p, g, slots, lr, h):
    return _sgd_step(p, g, lr), ()


def _heavy_ball(p, g, slots, lr, h):
    new_p, new_v = _momentum_step(p, _sgd_step(p, g, lr), slots[0], h["momentum"])
    return new_p, (new_v,)


def _nesterov(p, g, slots, lr, h):
    new_p, new_v = _nesterov_step(p, _sgd_step(p, g, lr), slots[0], h["momentum"])
    return new_p, (new_v,)


def _adagrad(p, g, slots, lr, h):
    accu = slots[0] + g**2
    return p - (lr * g / pt.sqrt(accu + h["epsilon"])), (accu,)


def _window_advance(counters, lr, h):
    (i,) = counters
    # The index is stored as a float (as PyMC does) and wraps to 0 after n_win - 1.
    return [pt.switch((i + 1) < h["n_win"], i + 1, 0)], (lr, i.astype("int32"))


def _adagrad_window(p, g, slots, ctx, h):
    lr, i = ctx
    window = pt.set_subtensor(slots[0][..., i], g**2)
    return p - (lr * g / pt.sqrt(window.sum(axis=-1) + h["epsilon"])), (window,)


def _rmsprop(p, g, slots, lr, h):
    rho = h["rho"]
    accu = rho * slots[0] + (1 - rho) * g**2
    return p - (lr * g / pt.sqrt(accu + h["epsilon"])), (accu,)


def _adadelta(p, g, slots, lr, h):
    rho, eps = h["rho"], h["epsilon"]
    accu, delta_accu = slots
    accu = rho * accu + (1 - rho) * g**2
    # The step is scaled by the delta accumulator from *before* this update.
    step = g * pt.sqrt(delta_accu + eps) / pt.sqrt(accu + eps)
    return p - lr * step, (accu, rho * delta_accu + (1 - rho) * step**2)


def _adam_advance(counters, lr, h):
    t = counters[0] + 1
    return [t], lr * pt.sqrt(1 - h["beta2"] ** t) / (1 - h["beta1"] ** t)


def _adam(p, g, slots, a_t, h):
    b1, b2 = h["beta1"], h["beta2"]
    m = b1 * slots[0] + (1 - b1) * g
    v = b2 * slots[1] + (1 - b2) * g**2
    return p - a_t * m / (pt.sqrt(v) + h["epsilon"]), (m, v)


def _adamax_advance(counters, lr, h):
    t = counters[0] + 1
    return [t], lr / (1 - h["beta1"] ** t)


def _adamax(p, g, slots, a_t, h):
    b1 = h["beta1"]
    m = b1 * slots[0] + (1 - b1) * g
    u = pt.maximum(h["beta2"] * slots[1], abs(g))
    return p - a_t * m / (u + h["epsilon"]), (m, u)


_LR_EPS = ("learning_rate", "epsilon")
_BETAS = ("learning_rate", "beta1", "beta2", "epsilon")
_RULES: dict[str, _Rule] = {
    "sgd": _Rule(("learning_rate",), _sgd),
    "momentum": _Rule(("learning_rate", "momentum"), _heavy_ball, n_slots=1),
    "nesterov_momentum": _Rule(("learning_rate", "momentum"), _nesterov, n_slots=1),
    "adagrad": _Rule(_LR_EPS, _adagrad, n_slots=1),
    "adagrad_window": _Rule(
        (*_LR_EPS, "n_win"),
        _adagrad_window,
        n_slots=1,
        n_counters=1,
        advance=_window_advance,
        slot_shape=lambda shape, h: (*shape, h["n_win"]),
    ),
    "rmsprop": _Rule(("learning_rate", "rho", "epsilon"), _rmsprop, n_slots=1),
    "adadelta": _Rule(("learning_rate", "rho", "epsilon"), _adadelta, n_slots=2),
    "adam": _Rule(_BETAS, _adam, n_slots=2, n_counters=1, advance=_adam_advance),
    "adamax": _Rule(_BETAS, _adamax, n_slots=2, n_counters=1, advance=_adamax_advance),
}


NAMES: tuple[str, ...] = tuple(_RULES)  # the optimizers, by the names of their functions


class OptState(NamedTuple):
    """An optimizer's accumulators, by what they belong to.

    ``slots[j]`` holds parameter ``j``'s own accumulators (adam's ``m, v``; none for sgd);
    ``counters`` are shared by all parameters (adam's ``t``). ``flat`` is the order a
    compiled step and a checkpoint take them in: every parameter's slots, then the counters
    (kept as such, so that a step makes one of these at the cost of a tuple).
    """

    flat: tuple[np.ndarray, ...]
    n_slots: int  # accumulators per parameter
    n_params: int

    @property
    def slots(self) -> tuple[tuple[np.ndarray, ...], ...]:
        k = self.n_slots
        return tuple(self.flat[j * k:(j + 1) * k] for j in range(self.n_params))

    @property
    def counters(self) -> tuple[np.ndarray, ...]:
        return self.flat[self.n_slots * self.n_params:]


def _like(new: TensorVariable, old: TensorVariable) -> TensorVariable:
    """Keep each output's dtype equal to its input's, so values can be fed back."""
    return new if new.dtype == old.dtype else pt.cast(new, old.dtype)


def _params_and_grads(loss_or_grads: LossOrGrads, params: Params) -> tuple[list, list]:
    """Validate PyMC-form arguments; differentiate the loss unless grads are given."""
    params = list(params)
    if any(not isinstance(p, SharedVariable) for p in params):
        raise ValueError("`params` must contain pytensor shared variables only")
    if isinstance(loss_or_grads, list | tuple):
        if len(loss_or_grads) != len(params):
            raise ValueError(
                f"Got {len(loss_or_grads)} gradient expressions for {len(params)} parameters"
            )
        return params, list(loss_or_grads)
    return params, list(pytensor.grad(loss_or_grads, params))


@dataclass(frozen=True)
class Optimizer:
    """A validated optimizer: a named pure update rule plus its hyperparameters.

    State is a flat tuple: for each param in order, its per-param accumulators (e.g.
    adam's ``m, v``), then the counters shared by all params (adam's ``t``).

    Parameters
    ----------
    name : str
        One of ``sgd, momentum, nesterov_momentum, adagrad, adagrad_window, rmsprop,
        adadelta, adam, adamax``.
    hyper : Mapping[str, Any]
        Every hyperparameter of that optimizer, including ``learning_rate`` (a positive
        float, or a callable schedule of the 0-based step).

    Raises
    ------
    ValueError
        If ``name`` is unknown or a hyperparameter is out of range.
    TypeError
        If a hyperparameter is missing, unknown or of the wrong type.

    Examples
    --------
    >>> opt = Optimizer("sgd", {"learning_rate": 0.1})
    >>> opt.init([(2,), (3, 4)])
    ()
    """

    name: str
    hyper: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.name not in _RULES:
            raise ValueError(f"Unknown optimizer {self.name!r}; expected one of {list(_RULES)}")
        names = self._rule.hyper_names
        given = dict(self.hyper)
        for key in given:
            if key not in names:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {key!r}")
        missing = [key for key in names if key not in given]
        if missing:
            raise TypeError(f"{self.name} is missing hyperparameters {missing}")
        for key in names:
            _CHECKS[key](key, given[key])
        object.__setattr__(self, "hyper", MappingProxyType({k: given[k] for k in names}))

    @property
    def _rule(self) -> _Rule:
        return _RULES[self.name]

    def init(self, shapes: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, ...]:
        """Return the zero initial state for params of the given ``shapes``.

        Parameters
        ----------
        shapes : sequence of tuple of int
            One shape per param, in param order.

        Returns
        -------
        tuple of numpy.ndarray
            float64 arrays: per-param accumulators (param-major), then 0-d counters.
        """
        rule = self._rule
        state = [
            np.zeros(rule.slot_shape(tuple(int(n) for n in shape), self.hyper), np.float64)
            for shape in shapes
            for _ in range(rule.n_slots)
        ]
        state += [np.zeros((), np.float64) for _ in range(rule.n_counters)]
        return tuple(state)

    def init_state(self, shapes: Sequence[tuple[int, ...]]) -> OptState:
        """The zero initial state for params of the given ``shapes``, by parameter."""
        return self.state_from_flat(self.init(shapes), len(shapes))

    def state_from_flat(self, flat: Sequence[np.ndarray], n_params: int) -> OptState:
        """The :class:`OptState` of ``flat`` (ordered as :meth:`init` returns it)."""
        rule = self._rule
        if len(flat) != rule.n_slots * n_params + rule.n_counters:
            raise ValueError(f"{self.name} keeps {rule.n_slots * n_params + rule.n_counters} "
                             f"state arrays for {n_params} parameters, got {len(flat)}")
        return OptState(tuple(flat), rule.n_slots, n_params)

    def update(
        self,
        params: Sequence[TensorVariable],
        grads: Sequence[TensorVariable],
        state: Sequence[TensorVariable],
        learning_rate: TensorVariable | float,
    ) -> tuple[list[TensorVariable], list[TensorVariable]]:
        """Apply the pure rule symbolically; nothing is shared or mutated.

        Parameters
        ----------
        params, grads : list of TensorVariable
            Current param values and their gradients, in the same order.
        state : list of TensorVariable
            Optimizer state, ordered as :meth:`init` returns it.
        learning_rate : TensorVariable or float
            Scalar learning rate for this step.

        Returns
        -------
        new_params, new_state : list of TensorVariable
            Updated values, each with the dtype of the corresponding input.

        Raises
        ------
        ValueError
            If the lengths of ``grads`` or ``state`` do not fit ``params``.
        """
        rule = self._rule
        params = [pt.as_tensor_variable(p) for p in params]
        grads = [pt.as_tensor_variable(g) for g in grads]
        state = [pt.as_tensor_variable(s) for s in state]
        k, n = rule.n_slots, len(params)
        if len(grads) != n:
            raise ValueError(f"Got {len(grads)} gradients for {n} parameters")
        if len(state) != k * n + rule.n_counters:
            raise ValueError(
                f"{self.name} expects {k * n + rule.n_counters} state entries for {n} "
                f"parameters, got {len(state)}"
            )
        counters = state[k * n :]
        new_counters, ctx = rule.advance(counters, learning_rate, self.hyper)
        new_params, new_state = [], []
        for j, (p, g) in enumerate(zip(params, grads)):
            slots = state[j * k : (j + 1) * k]
            new_p, new_slots = rule.per_param(p, g, slots, ctx, self.hyper)
            new_params.append(_like(new_p, p))
            new_state += [_like(new, old) for new, old in zip(new_slots, slots)]
        new_state += [_like(new, old) for new, old in zip(new_counters, counters)]
        return new_params, new_state

    def learning_rate_at(self, step: int) -> float:
        """Return the learning rate for the 0-based ``step`` (the constant if not a schedule).

        Raises
        ------
        ValueError
            If ``step`` is negative or the schedule yields a non-positive or non-finite value.
        """
        if not is_int(step):
            raise TypeError(f"`step` must be an int, got {step!r}")
        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}")
        lr = self.hyper["learning_rate"]
        if callable(lr):
            return _positive(f"learning_rate({step})", lr(int(step)))
        return float(lr)

    def __call__(self, loss_or_grads: LossOrGrads, params: Params) -> Updates:
        """Return PyMC-style updates over shared ``params`` and fresh shared state.

        Raises
        ------
        TypeError
            If the learning rate is a callable schedule.
        ValueError
            If ``params`` are not shared variables or the gradient count is wrong.
        """
        lr = self.hyper["learning_rate"]
        if callable(lr):
            raise TypeError(
                "A callable `learning_rate` (schedule) cannot be used with shared-variable "
                "updates; give a float, or use Optimizer.update with learning_rate_at(step)"
            )
        params, grads = _params_and_grads(loss_or_grads, params)
        rule = self._rule
        values = self.init([p.get_value(borrow=True).shape for p in params])
        owners = [p for p in params for _ in range(rule.n_slots)]
        state = [
            pytensor.shared(value.astype(p.dtype), shape=rule.slot_shape(p.type.shape, self.hyper))
            for value, p in zip(values, owners)
        ]
        state += [
            pytensor.shared(value.astype(pytensor.config.floatX)) for value in values[len(owners) :]
        ]
        new_params, new_state = self.update(params, grads, state, lr)
        return OrderedDict([*zip(params, new_params), *zip(state, new_state)])


def _make(
    name: str, loss_or_grads: LossOrGrads, params: Params, **hyper: Any
) -> Optimizer | Updates:
    optimizer = Optimizer(name, hyper)
    if loss_or_grads is None and params is None:
        return optimizer
    if loss_or_grads is None or params is None:
        raise ValueError("Please provide both `loss_or_grads` and `params` to get updates")
    return optimizer(loss_or_grads, params)


_DOC = """{summary}

Parameters
----------
loss_or_grads : TensorVariable or list of TensorVariable, optional
    A scalar loss to differentiate, or one gradient expression per param.
params : list of SharedVariable, optional
    The params to update.
learning_rate : float or callable, default {lr}
    Step size. A callable ``step -> float`` is a schedule, usable only through
    :meth:`Optimizer.update` with :meth:`Optimizer.learning_rate_at`.
{extra}
Returns
-------
OrderedDict or Optimizer
    ``{{param: new_param, ..., state: new_state, ...}}`` if both ``loss_or_grads`` and
    ``params`` are given; if neither is, an :class:`Optimizer` taking them later.

Raises
------
ValueError
    If only one of ``loss_or_grads``/``params`` is given, a param is not shared, the
    number of gradients differs from the number of params, or a hyperparameter is
    out of range.
TypeError
    If a hyperparameter has the wrong type, or a callable learning rate is used with
    shared variables.

Examples
--------
>>> import numpy as np, pytensor
>>> w = pytensor.shared(np.ones(3))
>>> step = pytensor.function([], [], updates={name}((w**2).sum(), [w]))
>>> step()
[]
"""


def _document(summary: str, **extra: str) -> Callable[[Callable], Callable]:
    """Fill the shared docstring template; ``extra`` maps a hyperparameter to its meaning."""

    def decorate(fn: Callable) -> Callable:
        defaults = dict(zip(fn.__code__.co_varnames, fn.__defaults__))
        lines = "".join(
            f"{key} : {type(defaults[key]).__name__}, default {defaults[key]}\n    {text}\n"
            for key, text in extra.items()
        )
        fn.__doc__ = _DOC.format(
            summary=summary, lr=defaults["learning_rate"], extra=lines, name=fn.__name__
        )
        return fn

    return decorate


_EPS = "Added to the denominator for numerical stability; > 0."
_MU = "Momentum coefficient, 0 <= momentum < 1."
_RHO = "Decay rate of the squared-gradient average, 0 < rho < 1."
_B1 = "Decay rate of the first moment, 0 <= beta1 < 1."
_B2 = "Decay rate of the second moment (adamax: of the max-norm), 0 <= beta2 < 1."


# Each public function only names its hyperparameters; ``locals()`` at entry is exactly
# the call's arguments, handed on to ``_make``.


@_document("Stochastic gradient descent: ``param - learning_rate * grad``.")
def sgd(
    loss_or_grads: LossOrGrads = None, params: Params = None, learning_rate: LearningRate = 1e-3
) -> Optimizer | Updates:
    return _make("sgd", **locals())


@_document("SGD followed by heavy-ball momentum on a per-param velocity.", momentum=_MU)
def momentum(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 1e-3,
    momentum: float = 0.9,
) -> Optimizer | Updates:
    return _make("momentum", **locals())


@_document("SGD followed by Nesterov momentum on a per-param velocity.", momentum=_MU)
def nesterov_momentum(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 1e-3,
    momentum: float = 0.9,
) -> Optimizer | Updates:
    return _make("nesterov_momentum", **locals())


@_document("Adagrad: scale by the root of the summed squared gradients.", epsilon=_EPS)
def adagrad(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 1.0,
    epsilon: float = 1e-6,
) -> Optimizer | Updates:
    return _make("adagrad", **locals())


@_document(
    "Adagrad over a sliding window of the last ``n_win`` squared gradients.",
    epsilon=_EPS,
    n_win="Window length, >= 1.",
)
def adagrad_window(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 0.001,
    epsilon: float = 0.1,
    n_win: int = 10,
) -> Optimizer | Updates:
    return _make("adagrad_window", **locals())


@_document("RMSProp: divide by a running RMS of the gradients.", rho=_RHO, epsilon=_EPS)
def rmsprop(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 1.0,
    rho: float = 0.9,
    epsilon: float = 1e-6,
) -> Optimizer | Updates:
    return _make("rmsprop", **locals())


@_document("Adadelta: RMSProp rescaled by a running RMS of past steps.", rho=_RHO, epsilon=_EPS)
def adadelta(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 1.0,
    rho: float = 0.95,
    epsilon: float = 1e-6,
) -> Optimizer | Updates:
    return _make("adadelta", **locals())


@_document("Adam with a bias-corrected step size.", beta1=_B1, beta2=_B2, epsilon=_EPS)
def adam(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 0.001,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
) -> Optimizer | Updates:
    return _make("adam", **locals())


@_document("Adamax: Adam with an infinity-norm scale.", beta1=_B1, beta2=_B2, epsilon=_EPS)
def adamax(
    loss_or_grads: LossOrGrads = None,
    params: Params = None,
    learning_rate: LearningRate = 0.002,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
) -> Optimizer | Updates:
    return _make("adamax", **locals())


def _apply_velocity(updates: Mapping, params: Sequence | None, mu: float, step) -> Updates:
    _CHECKS["momentum"]("momentum", mu)
    keys = list(updates.keys()) if params is None else list(params)
    updates = OrderedDict(updates)
    for param in keys:
        value = param.get_value(borrow=True)
        velocity = pytensor.shared(np.zeros(value.shape, value.dtype), shape=param.type.shape)
        updates[param], updates[velocity] = step(param, updates[param], velocity, mu)
    return updates


_APPLY_DOC = """Add {kind} momentum to existing updates.

Parameters
----------
updates : Mapping
    ``{{shared_param: updated_expression}}``, e.g. from :func:`sgd`.
params : sequence of SharedVariable, optional
    Params to give momentum; defaults to all keys of ``updates``.
momentum : float, default 0.9
    Momentum coefficient, 0 <= momentum < 1.

Returns
-------
OrderedDict
    A copy of ``updates`` with each param's update replaced and its velocity added.

Raises
------
ValueError
    If ``momentum`` is out of range.

Examples
--------
>>> import numpy as np, pytensor
>>> w = pytensor.shared(np.ones(3))
>>> len({name}(sgd((w**2).sum(), [w]), momentum=0.5))
2
"""


def apply_momentum(
    updates: Mapping, params: Sequence | None = None, momentum: float = 0.9
) -> Updates:
    return _apply_velocity(updates, params, momentum, _momentum_step)


def apply_nesterov_momentum(
    updates: Mapping, params: Sequence | None = None, momentum: float = 0.9
) -> Updates:
    return _apply_velocity(updates, params, momentum, _nesterov_step)


apply_momentum.__doc__ = _APPLY_DOC.format(kind="heavy-ball", name="apply_momentum")
apply_nesterov_momentum.__doc__ = _APPLY_DOC.format(
    kind="Nesterov", name="apply_nesterov_momentum"
)


def norm_constraint(
    tensor_var: TensorVariable,
    max_norm: float,
    norm_axes: Sequence[int] | None = None,
    epsilon: float = 1e-7,
) -> TensorVariable:
    """Rescale ``tensor_var`` so its norms over ``norm_axes`` are at most ``max_norm``.

    Parameters
    ----------
    tensor_var : TensorVariable
        The tensor to constrain.
    max_norm : float
        Largest allowed norm.
    norm_axes : sequence of int, optional
        Axes to take norms over. Defaults to ``(0,)`` for 2-D input and to all axes
        but the first for 3- to 5-D input.
    epsilon : float, default 1e-7
        Added to the norms before dividing.

    Returns
    -------
    TensorVariable
        The constrained tensor.

    Raises
    ------
    ValueError
        If ``norm_axes`` is None and ``tensor_var`` is not 2- to 5-D.

    Examples
    --------
    >>> import numpy as np
    >>> out = norm_constraint(pt.as_tensor(np.ones((2, 3))), 1.0)
    >>> np.round(out.eval()[:, 0], 4)
    array([0.7071, 0.7071])
    """
    ndim = tensor_var.ndim
    if norm_axes is not None:
        axes = tuple(norm_axes)
    elif ndim == 2:  # dense weights: one norm per output column
        axes = (0,)
    elif ndim in (3, 4, 5):  # convolution filters: one norm per output channel
        axes = tuple(range(1, ndim))
    else:
        raise ValueError(f"Unsupported tensor dimensionality {ndim}. Must specify `norm_axes`")
    cast = np.dtype(pytensor.config.floatX).type
    norms = pt.sqrt(pt.sum(pt.square(tensor_var), axis=axes, keepdims=True))
    return tensor_var * (pt.clip(norms, 0, cast(max_norm)) / (cast(epsilon) + norms))


def total_norm_constraint(
    tensor_vars: Sequence[TensorVariable],
    max_norm: float,
    epsilon: float = 1e-7,
    return_norm: bool = False,
) -> list[TensorVariable] | tuple[list[TensorVariable], TensorVariable]:
    """Rescale ``tensor_vars`` jointly so their combined norm is at most ``max_norm``.

    Parameters
    ----------
    tensor_vars : sequence of TensorVariable
        Tensors (typically gradients) to rescale.
    max_norm : float
        Largest allowed total norm.
    epsilon : float, default 1e-7
        Added to the norm before dividing.
    return_norm : bool, default False
        Also return the total norm before rescaling.

    Returns
    -------
    list of TensorVariable, or (list of TensorVariable, TensorVariable)
        The rescaled tensors, and the total norm if ``return_norm``.

    Examples
    --------
    >>> import numpy as np
    >>> scaled, norm = total_norm_constraint([pt.as_tensor(np.full(4, 3.0))], 1.0,
    ...                                      return_norm=True)
    >>> float(norm.eval())
    6.0
    """
    norm = pt.sqrt(sum(pt.sum(tensor**2) for tensor in tensor_vars))
    cast = np.dtype(pytensor.config.floatX).type
    multiplier = pt.clip(norm, 0, cast(max_norm)) / (cast(epsilon) + norm)
    scaled = [tensor * multiplier for tensor in tensor_vars]
    return (scaled, norm) if return_norm else scaled


@dataclass(frozen=True)
class GeometricDecay:
    """A learning-rate schedule: ``lr0`` until step ``start``, then a geometric decay that
    reaches ``end`` at step ``total`` (and stays there). Picklable, with a stable repr, so a
    run store can record it and a resumed run can check it is the same."""

    lr0: float
    end: float
    start: int
    total: int

    def __call__(self, step: int) -> float:
        if step <= self.start:
            return self.lr0
        frac = min((step - self.start) / max(self.total - self.start, 1), 1.0)
        return self.lr0 * (self.end / self.lr0) ** frac


def as_optimizer(opt: Any) -> Optimizer:
    """``opt`` as an :class:`Optimizer`: one already; one of these optimizer functions itself
    (``adam``: its default hyperparameters, as PyMC takes them); or PyMC's own, bare
    (``pm.adam``) or called without loss and params (``pm.adam(learning_rate=0.01)``, a
    ``functools.partial``): the same update rule of the same name (the rules equal PyMC's)."""
    import functools
    import sys

    this = sys.modules[__name__]
    if any(opt is getattr(this, name) for name in _RULES):
        return opt()
    func, keywords = opt, {}
    if isinstance(opt, functools.partial) and not opt.args:
        func, keywords = opt.func, dict(opt.keywords)
    name = getattr(func, "__name__", None)
    if getattr(func, "__module__", "") == "pymc.variational.updates" and name in _RULES:
        keywords = {k: v for k, v in keywords.items() if k not in ("loss_or_grads", "params")}
        return getattr(this, name)(**keywords)
    if not isinstance(opt, Optimizer):
        hint = ("; of PyMC's optimizers distvi takes pm.sgd ... pm.adamax, bare or called "
                "without loss and params" if str(getattr(getattr(opt, "func", opt), "__module__",
                                                         "")).startswith("pymc") else "")
        raise TypeError(
            "obj_optimizer must be one of distvi's optimizers, e.g. "
            f"distvi.adam(learning_rate=0.01), or the function itself (distvi.adam: its "
            f"defaults); got {getattr(opt, '__qualname__', type(opt).__name__)}{hint}"
        )
    return opt
