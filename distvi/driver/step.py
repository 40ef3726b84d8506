"""The step as a value: ``init``, ``draw``, ``direction``, ``update``.

A :class:`Program` is compiled once per (approximation, operator, optimizer, points per
step, clip, cost scale): one pure function from the parameters, the optimizer state, the
learning rate, this step's normals, the operator's inputs and the next step's normals to the
new parameters and optimizer state, the loss, the gradient norm, a finiteness flag and the
next step's points. KL and KSD share it: the operator gives only its terms
(:meth:`~distvi.operators.KL.step_terms`); clipping, the optimizer and the finiteness check
are written here once.

A :class:`Step` is that program with one fit's settings (whether a loss is computed, where
averaging starts, the normal stream): ``update`` maps a :class:`DriverState` to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytensor.tensor as pt

from distvi._compile import function
from distvi._rng import Stream
from distvi.driver.state import DriverState
from distvi.errors import NotFiniteError
from distvi.optimizers import OptState, Optimizer, total_norm_constraint

DRAW_BLOCK = 256  # steps of normals drawn at once (the stream is position-addressed)


def _finite(x):
    return pt.invert(pt.or_(pt.isnan(x), pt.isinf(x)))


class StepInfo(NamedTuple):
    """What one step reports: the loss estimate (NaN when not computed), the norm of the
    gradient before clipping, the learning rate used, and whether the step was finite."""

    loss: float
    grad_norm: float
    lr: float
    ok: bool


class Program(NamedTuple):
    """The compiled pure functions of a step (see the module docstring)."""

    update: Callable
    draw: Callable
    n_params: int
    n_draw: int
    scaled: bool = False


def compile_program(approx, operator, optimizer: Optimizer, n_draw: int, n_points: int,
                    max_norm: float | None, cost_scale: float = 1.0, scaled: bool = False,
                    dense: tuple[int, ...] = ()) -> Program:
    """Compile the step of ``operator`` on ``approx``: ``n_draw`` rows of normals a step,
    ``n_points`` points evaluated (equal, except for particles: no normals, n particles).

    ``scaled``: the program takes one more input per parameter, a positive array of its
    shape that multiplies the optimizer's change of it (a learning rate per coordinate, as
    fits run until convergence set from q's own scales). A parameter in ``dense`` (a
    vector) takes a square matrix ``A`` instead: the optimizer runs in the coordinates
    ``v`` of ``p = p0 + A v`` (its gradient ``A' g``, its change mapped back by ``A``), so a
    full-rank group's mean steps in q's own whitened directions."""
    adapter = approx.adapter
    D = adapter.ndim
    shapes = [np.shape(v) for v in approx.params_values]
    params = [pt.tensor(f"p{i}", dtype="float64", shape=s) for i, s in enumerate(shapes)]
    state = [pt.tensor(f"s{i}", dtype=np.asarray(a).dtype, shape=np.shape(a))
             for i, a in enumerate(optimizer.init(shapes))]
    lr = pt.scalar("lr", dtype="float64")
    eps = pt.matrix("eps", dtype="float64", shape=(n_draw, D))
    eps_next = pt.matrix("eps_next", dtype="float64", shape=(n_draw, D))
    scales = scale_inputs(shapes, dense) if scaled else []

    # the graph now (it reads the operator's settings), compiled on first use
    g = step_graph(approx, operator, optimizer, params, state, lr, eps, scales, n_points,
                   max_norm, cost_scale, dense)

    def update():
        return function(
            [*params, *state, lr, eps, *g.inputs, eps_next, *scales],
            [*g.params, *g.state, g.loss, g.grad_norm, g.ok,
             approx.symbolic_points(g.params, eps_next)],
            mode=adapter.compile_mode, trust_input=True, on_unused_input="ignore",
        )

    def draw():
        return function([*params, eps], approx.symbolic_points(params, eps), trust_input=True,
                        on_unused_input="ignore")

    # a fit that runs in fused blocks may never call them
    return Program(_Lazy(update), _Lazy(draw), len(shapes), n_draw, scaled)


class _Lazy:
    """A compiled function built by ``build()`` on its first call."""

    def __init__(self, build: Callable) -> None:
        self.build, self.fn = build, None

    def __call__(self, *args):
        return self.ready()(*args)

    def ready(self) -> Callable:
        """The compiled function, compiled now if it was not."""
        if self.fn is None:
            self.fn = self.build()
        return self.fn


class StepGraph(NamedTuple):
    """One step, symbolically: the operator's inputs (the workers' answers, or a Stein
    direction), the new parameters and optimizer state, the loss, the gradient norm before
    clipping, and whether the step is finite."""

    inputs: list
    params: list
    state: list
    loss: Any
    grad_norm: Any
    ok: Any


def scale_inputs(shapes, dense: tuple[int, ...] = ()) -> list:
    """The scaled step's rate scales: an array of each parameter's shape, or a square
    matrix for a parameter in ``dense`` (see :func:`compile_program`)."""
    return [pt.tensor(f"c{i}", dtype="float64", shape=(s * 2 if i in dense else s))
            for i, s in enumerate(shapes)]


def step_graph(approx, operator, optimizer: Optimizer, params, state, lr, eps, scales,
               n_points: int, max_norm: float | None, cost_scale: float = 1.0,
               dense: tuple[int, ...] = ()) -> StepGraph:
    """The step of ``operator`` on ``approx`` from the symbolic ``params``, optimizer
    ``state``, rate ``lr`` and normals ``eps`` (``scales``: empty, or as
    :func:`scale_inputs` makes them). The per-step program and the fused block both build
    their step here, so both compute the same maths."""
    terms = operator.step_terms(params, eps, n_points)
    loss, surrogate = terms.loss, terms.surrogate
    if cost_scale != 1.0:  # approx.scale_cost_to_minibatch: PyMC's per-minibatch units
        loss, surrogate = loss * cost_scale, surrogate * cost_scale
    grads = pt.grad(surrogate, params)
    grad_norm = pt.sqrt(sum(pt.sum(g**2) for g in grads))
    if max_norm is not None:
        grads = total_norm_constraint(grads, max_norm)
    if scales:
        grads = [c.T @ g if i in dense else g for i, (c, g) in enumerate(zip(scales, grads))]
    new_params, new_state = optimizer.update(params, grads, state, lr)
    if scales:
        new_params = [p + (c @ (q - p) if i in dense else c * (q - p))
                      for i, (p, c, q) in enumerate(zip(params, scales, new_params))]
    ok = terms.ok
    for p in new_params:
        ok = pt.and_(ok, pt.all(_finite(p)))
    return StepGraph(terms.inputs, list(new_params), list(new_state), loss, grad_norm, ok)


class Normals:
    """The driver's standard normals for the step at each stream position: ``n_draw x D``
    a step, drawn :data:`DRAW_BLOCK` steps at a time (equal to drawing them one by one)."""

    def __init__(self, stream: Stream, n_draw: int, ndim: int, end: int | None = None) -> None:
        self.stream, self.shape = stream, (n_draw, ndim)
        self.per_step = n_draw * ndim
        self.end = end  # the position after the run's last step: no block is drawn past it
        self._block: np.ndarray | None = None
        self._start = 0

    def at(self, position: int) -> np.ndarray:
        return self.pair(position)[0]

    def pair(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The normals of the step at ``position`` and of the next one."""
        if self.per_step == 0:
            return np.zeros(self.shape), np.zeros(self.shape)
        offset = position - self._start
        if self._block is None or not 0 <= offset < (len(self._block) - 1) * self.per_step:
            rows = DRAW_BLOCK
            if self.end is not None:
                rows = max(1, min(rows, (self.end - position) // self.per_step))
            self._block = self.stream.normal((rows + 1, *self.shape), position)
            self._start, offset = position, 0
        i = offset // self.per_step
        return self._block[i], self._block[i + 1]


class Step:
    """One fit's step: a :class:`Program` with the optimizer (for the learning rate at each
    ``opt_step``), the operator (for its explicit phase), the normal stream, whether the loss
    is computed (``with_logp``), and the step after which iterates are averaged."""

    def __init__(self, program: Program, approx, operator, optimizer: Optimizer,
                 stream: Stream, with_logp: bool = True, average_start: int | None = None,
                 steps: int | None = None, start: int = 0, scales: tuple = ()) -> None:
        self.program, self.approx, self.operator, self.optimizer = program, approx, operator, optimizer
        per_step = program.n_draw * approx.ndim
        self.normals = Normals(stream, program.n_draw, approx.ndim,
                               None if steps is None else start + steps * per_step)
        self.with_logp, self.average_start = with_logp, average_start
        if program.scaled and len(scales) != program.n_params:
            raise ValueError("a scaled program needs one scale array per parameter")
        self.scales = tuple(scales) if program.scaled else ()
        lr = optimizer.hyper["learning_rate"]
        self._constant_lr = None if callable(lr) else np.array(float(lr), dtype="float64")

    def init(self, params, previous: DriverState | None = None) -> DriverState:
        """A fresh optimizer at ``params``; the run's step and stream position go on from
        ``previous``."""
        return DriverState.fresh(self.optimizer, params, previous)

    def learning_rate(self, opt_step: int) -> np.ndarray:
        if self._constant_lr is not None:  # no call into the schedule on every step
            return self._constant_lr
        return np.array(self.optimizer.learning_rate_at(opt_step), dtype="float64")

    def draw(self, state: DriverState) -> np.ndarray:
        """The points at ``state``: the parameters and this step's normals."""
        return self.program.draw(*state.params, self.normals.at(state.draw_position))

    def direction(self, points: np.ndarray, answers, backend) -> Any:
        """The operator's explicit phase (KSD's Stein direction; None for KL)."""
        return self.operator.direction(points, answers, backend)

    def update(self, state: DriverState, points: np.ndarray, answers,
               direction: Any = None) -> tuple[DriverState, StepInfo, np.ndarray]:
        """The next state, what this step reports, and the next step's points.

        Raises :class:`~distvi.errors.NotFiniteError` (``state`` stays the last finite one)
        when the loss, the gradients or the new parameters are NaN or inf.
        """
        lr = self.learning_rate(state.opt_step)
        inputs, ok = self.operator.step_inputs(answers, direction, self.with_logp)
        if not ok:
            raise not_finite_error(self.approx, state.step, points, answers[1], state.params)
        pos = state.draw_position
        eps, eps_next = self.normals.pair(pos)
        opt = state.opt_state
        out = self.program.update(*state.params, *opt.flat, lr, eps, *inputs, eps_next, *self.scales)
        p = self.program.n_params
        params = tuple(out[:p])
        loss, grad_norm, ok, next_points = out[-4:]
        if not ok:
            raise not_finite_error(self.approx, state.step, points, answers[1], params)
        step, avg, n_avg = state.step + 1, state.average, state.n_averaged
        if self.average_start is not None and step > self.average_start:
            n_avg += 1
            avg = (tuple(np.array(v) for v in params) if n_avg == 1 else
                   tuple(a + (v - a) / n_avg for a, v in zip(avg, params)))
        new = DriverState(params, OptState(tuple(out[p:-4]), opt.n_slots, p), step,
                          state.opt_step + 1, pos + self.normals.per_step, avg, n_avg)
        return new, StepInfo(loss, grad_norm, lr, True), next_points


def not_finite_error(approx, step: int, points, datagrad, params) -> NotFiniteError:
    """The error for a non-finite step, naming the variables whose points, gradients or
    parameters are not finite (all of them when none can be singled out)."""
    names = approx.param_names_flat()
    bad = set()
    for arr in (points, datagrad):
        cols = np.flatnonzero(~np.isfinite(arr).all(axis=0))
        bad.update(names[c] for c in cols)
    if not bad:
        for (gi, _), value in zip(approx.param_keys, params):
            g, value = approx.groups[gi], np.asarray(value)
            if value.shape == g.indices.shape:
                bad.update(names[g.indices[j]] for j in np.flatnonzero(~np.isfinite(value)))
            elif not np.all(np.isfinite(value)):
                bad.update(names[j] for j in g.indices)
    if not bad:
        bad = set(names)
    return NotFiniteError(
        f"NaN or inf at step {step}: loss or parameters became non-finite "
        f"(variables: {sorted(bad)}); the approximation keeps the last finite parameters"
    )
