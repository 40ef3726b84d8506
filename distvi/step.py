"""The driver's step: one pure compiled function, state in, new state out.

From the summed worker answers at the drawn points it computes the prior term, the chain
rule to the variational parameters, the clip and the optimizer update, and draws the next
step's points from the updated parameters (so a step costs one call on the driver).
Everything that changes during a run is in :class:`DriverState`, plain arrays and ints.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pytensor.tensor as pt

from distvi._compile import function
from distvi.optimizers import Optimizer, total_norm_constraint


def _finite(x):
    return pt.invert(pt.or_(pt.isnan(x), pt.isinf(x)))


class DriverState(NamedTuple):
    """Everything that changes during a run, as plain values.

    ``step`` counts every step of the run and keys the workers' minibatches; ``opt_step``
    counts the steps of the current optimizer (the argument of a learning-rate schedule);
    ``draw_position`` is where the driver's normal stream stands; ``average`` is the mean of
    the last ``n_averaged`` iterates of the parameters (Polyak-Ruppert averaging).
    """

    params: tuple[np.ndarray, ...]
    opt_state: tuple[np.ndarray, ...]
    step: int
    opt_step: int
    draw_position: int
    average: tuple[np.ndarray, ...] = ()  # running mean of the iterates (``average_from``)
    n_averaged: int = 0


def _inputs(step, approx, optimizer: Optimizer, n_draw: int):
    """The step's symbolic inputs: parameters, optimizer state, learning rate, this step's and
    the next step's normals; sets ``step.n_params`` and ``step.n_state``."""
    D = approx.adapter.ndim
    shapes = [np.shape(v) for v in approx.params_values]
    step.n_params = len(shapes)
    params = [pt.tensor(f"p{i}", dtype="float64", shape=s) for i, s in enumerate(shapes)]
    state0 = optimizer.init(shapes)
    step.n_state = len(state0)
    state = [pt.tensor(f"s{i}", dtype=np.asarray(a).dtype, shape=np.shape(a))
             for i, a in enumerate(state0)]
    lr = pt.scalar("lr", dtype="float64")
    eps = pt.matrix("eps", dtype="float64", shape=(n_draw, D))
    eps_next = pt.matrix("eps_next", dtype="float64", shape=(n_draw, D))
    return params, state, lr, eps, eps_next


class CompiledStep:
    """The compiled pure step for one (approximation, operator, optimizer, obj_n_mc, clip).

    ``__call__(params, opt_state, lr, eps, points, datalogp, datagrad, eps_next)`` returns
    ``(new_params, new_opt_state, loss, grad_norm, ok, next_points)``; ``n_draw`` is the
    number of normal rows a step draws.
    """

    def __init__(self, approx, operator, optimizer: Optimizer, n_mc: int,
                 max_norm: float | None, cost_scale: float = 1.0) -> None:
        adapter = approx.adapter
        D = adapter.ndim
        self.n_draw = n_mc
        self.needs_logp = self.with_logp = True
        params, state, lr, eps, eps_next = _inputs(self, approx, optimizer, n_mc)
        datalogp = pt.vector("datalogp", dtype="float64", shape=(n_mc,))
        datagrad = pt.matrix("datagrad", dtype="float64", shape=(n_mc, D))

        def prior_rows(points):
            return adapter.rows_of(adapter.prior_logp, points, n_mc)

        loss, surrogate = operator.objective(params, eps, datalogp, datagrad, prior_rows)
        if cost_scale != 1.0:  # approx.scale_cost_to_minibatch: PyMC's per-minibatch units
            loss, surrogate = loss * cost_scale, surrogate * cost_scale
        grads = pt.grad(surrogate, params)
        grad_norm = pt.sqrt(sum(pt.sum(g**2) for g in grads))
        if max_norm is not None:
            grads = total_norm_constraint(grads, max_norm)
        new_params, new_state = optimizer.update(params, grads, state, lr)
        ok = _finite(loss)
        for p in new_params:
            ok = pt.and_(ok, pt.all(_finite(p)))
        next_points = approx.symbolic_points(new_params, eps_next)
        self._fn = function(
            [*params, *state, lr, eps, datalogp, datagrad, eps_next],
            [*new_params, *new_state, loss, grad_norm, ok, next_points],
            mode=adapter.compile_mode,
            trust_input=True,
            on_unused_input="ignore",
        )
        self._draw = function(
            [*params, eps], approx.symbolic_points(params, eps), trust_input=True,
            on_unused_input="ignore",
        )

    def draw(self, params, eps: np.ndarray) -> np.ndarray:
        """The points for ``eps`` at ``params``."""
        return self._draw(*params, eps)

    def __call__(self, params, opt_state, lr: np.ndarray, eps, points, datalogp, datagrad, eps_next):
        out = self._fn(*params, *opt_state, lr, eps, datalogp, datagrad, eps_next)
        p, s = self.n_params, self.n_state
        return (tuple(out[:p]), tuple(out[p:p + s]), out[p + s], out[p + s + 1],
                out[p + s + 2], out[p + s + 3])


class SteinStep:
    """The driver's step for KSD (SVGD, ASVGD), with the same call as :class:`CompiledStep`.

    Three parts: the prior term and its gradient at the points (compiled), the Stein
    direction ``phi`` from the summed gradients (numpy; by the driver or, through
    ``kernel_rows``, by the shard workers), and the compiled update that carries ``-phi`` to
    the parameters, clips, and applies the optimizer. KSD itself has no loss; with
    ``with_logp`` the step reports the mean negative log density of the points (full-data
    units), otherwise NaN.

    ``direction_fn(points, grads, temperature)`` returns ``phi`` (n x D); ``last_kernel_s``
    is the time the last step spent on it (bandwidth and ``phi``).
    """

    def __init__(self, approx, operator, optimizer: Optimizer, n_points: int,
                 max_norm: float | None, direction_fn) -> None:
        adapter = approx.adapter
        D = adapter.ndim
        self.n_draw = 0 if approx.all_histograms else n_points
        self.direction_fn = direction_fn
        self.needs_logp = False
        self.with_logp = True  # set per run: without it the loss is not computed (NaN)
        self.temperature = operator.temperature
        self.last_kernel_s = 0.0
        params, state, lr, eps, eps_next = _inputs(self, approx, optimizer, self.n_draw)
        phi = pt.matrix("phi", dtype="float64", shape=(n_points, D))
        points = approx.symbolic_points(params, eps)
        grads = pt.grad(operator.surrogate(points, phi), params)
        grad_norm = pt.sqrt(sum(pt.sum(g**2) for g in grads))
        if max_norm is not None:
            grads = total_norm_constraint(grads, max_norm)
        new_params, new_state = optimizer.update(params, grads, state, lr)
        ok = pt.as_tensor(np.array(True))
        for p in new_params:
            ok = pt.and_(ok, pt.all(_finite(p)))
        self._update = function(
            [*params, *state, lr, eps, phi, eps_next],
            [*new_params, *new_state, grad_norm, ok,
             approx.symbolic_points(new_params, eps_next)],
            mode=adapter.compile_mode, trust_input=True, on_unused_input="ignore",
        )
        self._draw = function([*params, eps], points, trust_input=True,
                                       on_unused_input="ignore")
        self._prior = adapter.compile_prior_term(n_points)

    def draw(self, params, eps: np.ndarray) -> np.ndarray:
        return self._draw(*params, eps)

    def direction(self, points: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """The Stein direction ``phi`` at ``points`` with log-density gradients ``grads``."""
        t0 = time.perf_counter()
        phi = self.direction_fn(points, grads, self.temperature)
        self.last_kernel_s = time.perf_counter() - t0
        return phi

    def __call__(self, params, opt_state, lr: np.ndarray, eps, points, datalogp, datagrad, eps_next):
        prior_logp, prior_grad = self._prior(points)
        grads = datagrad + prior_grad
        loss = -float(np.mean(datalogp + prior_logp)) if self.with_logp else np.nan
        ok = (np.isfinite(loss) or not self.with_logp) and bool(np.all(np.isfinite(grads)))
        if not ok:  # reported by the caller, with the parameters unchanged
            return params, opt_state, loss, np.nan, False, points
        phi = self.direction(points, grads)
        out = self._update(*params, *opt_state, lr, eps, phi, eps_next)
        p, s = self.n_params, self.n_state
        return (tuple(out[:p]), tuple(out[p:p + s]), loss, out[p + s], bool(out[p + s + 1]),
                out[p + s + 2])
