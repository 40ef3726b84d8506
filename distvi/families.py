"""The variational families, each written once, symbolically.

A family describes q for one group of value variables in the flat unconstrained space: its
parameters (plain arrays, by name), how to draw from it given standard normals, its entropy,
log density and moments, all as PyTensor expressions of symbolic parameters with static
shapes. The driver's compiled step builds on the expressions directly; numeric values
(moments, draws for results) come from :meth:`Family.evaluate`, which compiles the same
expressions once per family, quantity and parameter shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytensor.tensor as pt

from distvi._validate import is_int

LOG_2PI = float(np.log(2 * np.pi))
# compiled numeric functions kept at once (every family, quantity and shape together)
COMPILED_MAX = 256


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))``, numerically (the families use PyTensor's own symbolically)."""
    return np.logaddexp(0.0, x)


def softplus_inv(y: np.ndarray) -> np.ndarray:
    """The inverse of :func:`softplus`: the unconstrained value of a standard deviation."""
    y = np.asarray(y, dtype="float64")
    return y + np.log(-np.expm1(-y))


def tril_size(d: int) -> int:
    """The number of entries of a ``d`` x ``d`` lower triangle."""
    return d * (d + 1) // 2


_compiled: dict[tuple, Any] = {}


class Family:
    """A variational family: symbolic draws, density and moments of q for one group.

    Subclasses set ``name`` and ``param_names`` and write the symbolic methods on ``p``, a
    dict of tensors by parameter name whose shapes are static (the dimension ``d`` is read
    from them).
    """

    name: str = ""
    param_names: tuple[str, ...] = ()

    def param_shapes(self, d: int) -> dict:
        """Parameter shapes for ``d`` variables (``None``: any length)."""
        raise NotImplementedError

    def init(self, mean: np.ndarray, sigma: np.ndarray | None) -> dict[str, np.ndarray]:
        """Initial parameters (arrays) for the given mean and standard deviations."""
        raise NotImplementedError

    def draw(self, p, eps, picks=None):
        """Points (S, d) for the standard normals ``eps`` (S, d); ``picks`` is for families
        of particles (which particles), and ignored by the others."""
        raise NotImplementedError

    def entropy(self, p):
        """The entropy of q, a scalar."""
        raise TypeError(f"a {self.name} group has no density (entropy)")

    def logq(self, p, z):
        """log q at the points ``z`` (S, d), (S,)."""
        raise TypeError(f"a {self.name} group has no density (logq)")

    def mean(self, p):
        """The mean of q, (d,)."""
        raise NotImplementedError

    def var(self, p):
        """The variances of q, (d,)."""
        raise NotImplementedError

    def cov(self, p):
        """The covariance of q, (d, d)."""
        raise NotImplementedError

    def std(self, p):
        """The standard deviations of q, (d,)."""
        return pt.sqrt(self.var(p))

    def evaluate(self, what: str, params: Mapping[str, Any], *args: np.ndarray) -> np.ndarray:
        """The value of the symbolic method ``what`` (``"mean"``, ``"draw"``, ...) at the
        parameter values ``params`` and further array arguments ``args``.

        The expression is compiled on first use for this family, quantity and parameter
        shapes (``args`` keep only their number of dimensions and dtype, so e.g. any number
        of draws shares one function) and kept for later calls.
        """
        from distvi._compile import function

        values = [np.asarray(params[k], dtype="float64") for k in self.param_names]
        extra = [np.asarray(a) for a in args]
        key = (type(self), what, tuple(v.shape for v in values),
               tuple((a.dtype.str, a.ndim) for a in extra))
        fn = _compiled.get(key)
        if fn is None:
            sym = {k: pt.tensor(k, dtype="float64", shape=v.shape)
                   for k, v in zip(self.param_names, values)}
            ins = [pt.tensor(dtype=a.dtype, shape=(None,) * a.ndim) for a in extra]
            fn = function([*sym.values(), *ins], getattr(self, what)(sym, *ins),
                          on_unused_input="ignore")
            if len(_compiled) >= COMPILED_MAX:  # oldest first: dicts keep insertion order
                del _compiled[next(iter(_compiled))]
            _compiled[key] = fn
        return np.asarray(fn(*values, *extra))


class MeanFieldFamily(Family):
    """Independent normals: ``z = mu + softplus(rho) * eps``."""

    name = "mean_field"
    param_names = ("mu", "rho")

    def param_shapes(self, d: int) -> dict:
        return {"mu": (d,), "rho": (d,)}

    def init(self, mean: np.ndarray, sigma: np.ndarray | None) -> dict[str, np.ndarray]:
        rho = np.zeros_like(mean) if sigma is None else softplus_inv(sigma)
        return {"mu": mean.copy(), "rho": rho}

    def draw(self, p, eps, picks=None):
        return p["mu"] + pt.softplus(p["rho"]) * eps

    def entropy(self, p):
        d = p["mu"].type.shape[0]
        return pt.sum(pt.log(pt.softplus(p["rho"]))) + 0.5 * d * (1.0 + LOG_2PI)

    def logq(self, p, z):
        sigma = pt.softplus(p["rho"])
        r = (z - p["mu"]) / sigma
        return pt.sum(-0.5 * r**2 - pt.log(sigma) - 0.5 * LOG_2PI, axis=-1)

    def mean(self, p):
        return p["mu"]

    def var(self, p):
        return pt.softplus(p["rho"]) ** 2

    def std(self, p):
        return pt.softplus(p["rho"])

    def cov(self, p):
        return pt.diag(self.var(p))


class FullRankFamily(Family):
    """A multivariate normal: ``z = mu + L eps``, ``L`` lower triangular, packed row-major
    (``np.tril_indices``) in ``L_tril``, with softplus on its diagonal."""

    name = "full_rank"
    param_names = ("mu", "L_tril")

    @staticmethod
    def diag_positions(d: int) -> np.ndarray:
        """Where the diagonal of ``L`` lies in ``L_tril``."""
        rows, cols = np.tril_indices(d)
        return np.flatnonzero(rows == cols)

    def param_shapes(self, d: int) -> dict:
        return {"mu": (d,), "L_tril": (tril_size(d),)}

    def init(self, mean: np.ndarray, sigma: np.ndarray | None) -> dict[str, np.ndarray]:
        d = mean.shape[0]
        packed = np.eye(d)[np.tril_indices(d)]
        if sigma is not None:
            packed[self.diag_positions(d)] = softplus_inv(sigma)
        return {"mu": mean.copy(), "L_tril": packed}

    def L(self, p):
        """The Cholesky factor of q's covariance, (d, d)."""
        # one flat index vector and a constant mask: PyTensor compiles these to C ops (row and
        # column fancy indices would run as Python ops, ~30 µs a step at any size)
        d = p["mu"].type.shape[0]
        rows, cols = np.tril_indices(d)
        on_diag = pt.as_tensor(rows == cols)
        packed = pt.switch(on_diag, pt.softplus(p["L_tril"]), p["L_tril"])
        return pt.set_subtensor(pt.zeros(d * d)[rows * d + cols], packed).reshape((d, d))

    def draw(self, p, eps, picks=None):
        return p["mu"] + eps @ self.L(p).T

    def entropy(self, p):
        d = p["mu"].type.shape[0]
        diag = self.diag_positions(d)
        return pt.sum(pt.log(pt.softplus(p["L_tril"][diag]))) + 0.5 * d * (1.0 + LOG_2PI)

    def logq(self, p, z):
        L = self.L(p)
        r = pt.linalg.solve_triangular(L, (z - p["mu"]).T, lower=True).T
        d = p["mu"].type.shape[0]
        return (
            pt.sum(-0.5 * r**2, axis=-1)
            - pt.sum(pt.log(pt.diagonal(L)))
            - 0.5 * d * LOG_2PI
        )

    def mean(self, p):
        return p["mu"]

    def cov(self, p):
        L = self.L(p)
        return L @ L.T

    def var(self, p):
        return pt.sum(self.L(p) ** 2, axis=1)


class EmpiricalFamily(Family):
    """A set of draws or particles (``histogram``: T x d); q is their empirical distribution.

    Without given draws, ``size`` particles start at the group's start point plus normal
    noise of standard deviation ``jitter``, drawn from ``random_seed`` (None: fresh entropy).
    """

    name = "empirical"
    param_names = ("histogram",)

    def __init__(self, size: int | None = None, jitter: float = 1.0,
                 random_seed: int | None = None) -> None:
        if size is not None:
            if not is_int(size):
                raise TypeError(f"size must be an int, got {type(size).__name__}")
            if size < 1:
                raise ValueError(f"size must be >= 1, got {size}")
        jitter_ok = not isinstance(jitter, bool) and isinstance(jitter, int | float | np.integer | np.floating)
        if not jitter_ok:
            raise TypeError(f"jitter must be a number, got {type(jitter).__name__}")
        if not (jitter >= 0 and np.isfinite(jitter)):
            raise ValueError(f"jitter must be a finite number >= 0, got {jitter}")
        from distvi._rng import check_seed

        self.size = None if size is None else int(size)
        self.jitter = float(jitter)
        self.seed = check_seed(random_seed)

    def param_shapes(self, d: int) -> dict:
        return {"histogram": (None, d)}

    def init(self, mean, sigma):
        if self.size is None:
            raise ValueError("an Empirical group needs its draws (params={'histogram': ...}) or a size")
        from distvi._rng import INIT_STREAM, Stream

        noise = Stream(self.seed, INIT_STREAM).normal((self.size, mean.shape[0]), 0)
        return {"histogram": mean[None, :] + self.jitter * noise}

    def draw(self, p, eps, picks=None):
        # the driver's points are the particles themselves (eps is not used); a draw from q
        # (picks given) is the particles at those positions
        return p["histogram"] if picks is None else p["histogram"][picks]

    def mean(self, p):
        return p["histogram"].mean(axis=0)

    def cov(self, p):
        h = p["histogram"]
        centred = h - h.mean(axis=0)
        return centred.T @ centred / h.shape[0]

    def var(self, p):
        return p["histogram"].var(axis=0)


FAMILIES = {
    "mean_field": MeanFieldFamily,
    "mf": MeanFieldFamily,
    "full_rank": FullRankFamily,
    "fr": FullRankFamily,
    "empirical": EmpiricalFamily,
}
