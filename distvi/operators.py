"""Operators: the objective the driver minimises, built from the summed worker answers.

``KL`` splits the negative ELBO the way data parallelism needs it:

    loss = -datalogp + beta * (logq - varlogp)

where ``datalogp`` (the data term, in full-data units) and its gradient at the drawn points
come from the workers, ``varlogp`` (the prior term) is computed once on the driver, and
``logq`` is the approximation's own. The data term's gradient enters the chain rule through
the surrogate ``sum(z * g)``, with ``g`` the workers' gradient held constant.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.gradient import disconnected_grad
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op

from distvi._validate import is_int


def _finite(x):
    return pt.invert(pt.or_(pt.isnan(x), pt.isinf(x)))


class Direction(NamedTuple):
    """A Stein step's explicit phase: ``phi`` at the points (None when ``ok`` is False), the
    log density (data + prior) at each point, and whether its gradients were finite."""

    phi: np.ndarray | None
    logp: np.ndarray
    ok: bool


class StepTerms(NamedTuple):
    """An operator's part of the compiled step: its extra inputs, the loss, the surrogate
    whose gradient is the update's, and whether the loss is finite."""

    inputs: list
    loss: Any
    surrogate: Any
    ok: Any


class KL:
    """Kullback-Leibler divergence KL(q || p), optionally tempered by ``beta``.

    Parameters
    ----------
    approx
        The approximation q.
    beta
        Weight of the prior and entropy terms (``beta=1`` is the ELBO); must be > 0.
    stl
        Use the sticking-the-landing estimator (Roeder, Wu and Duvenaud, 2017): the log
        density of q is evaluated with its parameters held constant, removing the score
        term whose expectation is zero. Lower variance as q approaches the posterior.
        ``None`` (the default): off for a fixed number of steps, on for a fit run until
        convergence (``fit(n=None)``), whose last phases sit at the optimum.
    """

    needs_logp = True  # the loss needs the data term's value
    fusable = True  # no explicit phase: a step is one compiled graph (fused blocks)

    def __init__(self, approx, beta: float = 1.0, stl: bool | None = None) -> None:
        beta = float(beta)
        if not beta > 0 or beta != beta or beta == float("inf"):
            raise ValueError(f"beta must be a positive finite number, got {beta}")
        self.approx = approx
        self.beta = beta
        self.stl_choice = None if stl is None else bool(stl)  # None: by the kind of fit
        self.stl = bool(stl)

    def __call__(self, f=None):
        """PyMC's ``KL(approx)()``: the objective, which ``(n_mc)`` turns into a Monte-Carlo
        estimate of the loss (see :class:`Objective`)."""
        if f is not None:
            raise TypeError("KL takes no test function")
        return Objective(self)

    def step_terms(self, params, eps, n_points: int) -> StepTerms:
        """The step's symbolic terms: the summed worker answers at the ``n_points`` points
        are its inputs."""
        adapter = self.approx.adapter
        datalogp = pt.vector("datalogp", dtype="float64", shape=(n_points,))
        datagrad = pt.matrix("datagrad", dtype="float64", shape=(n_points, adapter.ndim))

        def prior_rows(points):
            return adapter.rows_of(adapter.prior_logp, points, n_points)

        loss, surrogate = self.objective(params, eps, datalogp, datagrad, prior_rows)
        return StepTerms([datalogp, datagrad], loss, surrogate, _finite(loss))

    @staticmethod
    def direction(points, answers, backend) -> None:
        """KL has no explicit phase: its update is the loss's gradient."""
        return None

    @staticmethod
    def step_inputs(answers, direction, with_logp: bool) -> tuple[tuple, bool]:
        return answers, True

    def objective(self, params, eps, datalogp, datagrad, prior_rows):
        """Symbolic (loss, surrogate) for one step.

        ``prior_rows(points)`` gives the prior term at each point; ``datalogp`` (S,) and
        ``datagrad`` (S, D) are the summed worker answers at ``points``. The gradient of
        ``surrogate`` with respect to ``params`` is the gradient of the loss estimate.
        """
        approx = self.approx
        points = approx.symbolic_points(params, eps)
        varlogp = pt.mean(prior_rows(points))
        if self.stl:
            frozen = [disconnected_grad(p) for p in params]
            logq = pt.mean(approx.symbolic_logq(frozen, points))
        else:
            logq = -approx.symbolic_entropy(params)
        n_points = points.shape[0].astype("float64")
        data_value = pt.mean(datalogp)
        data_surrogate = pt.sum(points * datagrad) / n_points
        loss = -data_value + self.beta * (logq - varlogp)
        surrogate = -data_surrogate + self.beta * (logq - varlogp)
        return loss, surrogate


class KSD:
    """Kernelized Stein discrepancy: the operator of Stein variational gradient descent.

    It has no loss: the update moves each point along the Stein direction ``phi`` (see
    :mod:`distvi.stein`). For particles (an Empirical approximation) the parameters are the
    points; for a parametric approximation (ASVGD) ``phi`` at the drawn points is carried to
    the parameters by the chain rule.

    Parameters
    ----------
    approx
        The approximation.
    temperature
        Divides the density part of ``phi``; > 1 spreads the particles more.
    kernel, shard_kernel_above
        The kernel, and the kernel work ``n * n * D`` from which the shard workers compute
        ``phi`` by slices of points (see :class:`~distvi.stein.SteinDirection`).
    """

    needs_logp = False  # the update needs only the gradients; a loss is reported on request

    def __init__(self, approx, temperature: float = 1, *, kernel: Any = None,
                 shard_kernel_above: float | None = None) -> None:
        from distvi.stein import RBF, SteinDirection, check_temperature

        self.approx = approx
        self.temperature = check_temperature(temperature)
        self.stein = SteinDirection(RBF if kernel is None else kernel, shard_kernel_above,
                                    self.temperature)

    @staticmethod
    def surrogate(points, phi):
        """Its gradient with respect to the parameters is minus ``phi`` pulled back through
        the points (``phi`` is an input, held constant)."""
        return -pt.sum(points * phi)

    def step_terms(self, params, eps, n_points: int) -> StepTerms:
        """The step's symbolic terms: ``phi`` and the loss (computed from the direction's
        log density, or NaN without one) are its inputs."""
        phi = pt.matrix("phi", dtype="float64", shape=(n_points, self.approx.adapter.ndim))
        loss = pt.scalar("loss", dtype="float64")
        points = self.approx.symbolic_points(params, eps)
        return StepTerms([phi, loss], loss, self.surrogate(points, phi),
                         pt.as_tensor(np.array(True)))

    def direction(self, points: np.ndarray, answers, backend) -> Direction:
        """The Stein direction at ``points`` from the workers' summed answers plus the prior
        term (computed here, once)."""
        datalogp, datagrad = answers
        prior_logp, prior_grad = self.approx.adapter.compile_prior_term(len(points))(points)
        grads = datagrad + prior_grad
        logp = datalogp + prior_logp
        if not np.all(np.isfinite(grads)):
            return Direction(None, logp, False)
        return Direction(self.stein(points, grads, backend), logp, True)

    @staticmethod
    def step_inputs(answers, direction: Direction, with_logp: bool) -> tuple[tuple, bool]:
        # without a loss to report the workers skip the data term's value (NaN here)
        loss = -float(np.mean(direction.logp)) if with_logp else np.nan
        ok = direction.ok and (np.isfinite(loss) or not with_logp)
        return (direction.phi, np.asarray(loss)), ok


class _Numeric(Op):
    """A value computed in Python on every evaluation (no props: each instance is its own op,
    so graph merging never joins two of them). Its input is a shared token, so constant
    folding leaves it alone."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def make_node(self, token):
        return Apply(self, [pt.as_tensor(token)], [pt.dscalar()])

    def perform(self, node, inputs, output_storage) -> None:
        output_storage[0][0] = np.asarray(self.fn(), dtype="float64")


class Objective:
    """``KL(approx)()``, as PyMC's objective function: ``objective(n_mc)`` is a symbolic scalar
    whose every evaluation is a fresh Monte-Carlo estimate, from ``n_mc`` draws of q, of
    ``-datalogp + beta (logq - varlogp)`` on all the data (the negative ELBO for ``beta=1``;
    divided by ``N / B`` when ``approx.scale_cost_to_minibatch`` is set). The data term is
    evaluated by the fit's shard workers."""

    def __init__(self, op: KL) -> None:
        self.op, self.approx = op, op.approx

    def __call__(self, nmc: int = 1, random_seed: int | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected keywords {sorted(kwargs)}")
        if not is_int(nmc) or nmc < 1:
            raise ValueError(f"nmc must be an int >= 1, got {nmc!r}")
        rng = np.random.default_rng(random_seed)
        approx, beta = self.approx, self.op.beta
        approx.require_bound()
        token = pytensor.shared(np.int64(0), name="mc_token")
        return _Numeric(lambda: approx.mc_loss(int(nmc), beta, rng))(token)
