"""Errors shared by several parts of distvi."""

from __future__ import annotations


class NotFiniteError(ValueError, FloatingPointError):
    """A NaN or infinite number where a finite one is needed: a learning rate (refused before
    any work starts) or the loss or parameters of a fit (raised at the step where they became
    non-finite).

    It is a ``FloatingPointError``, as PyMC raises for a NaN loss, and a ``ValueError``, as a
    bad argument is: code written to catch either catches it.
    """


class DivergenceWarning(UserWarning):
    """A fit whose loss climbed far above the level it had reached: the learning rate is
    likely too large for it (said once per fit, with the step)."""


class StartWarning(UserWarning):
    """``start="map"`` could not find a start (L-BFGS made no progress, or no Gaussian along
    its path had a finite ELBO): the fit starts from the approximation's own start."""


class ConvergenceWarning(UserWarning):
    """A fit run until convergence (``n=None``) stopped without converging: it reached
    ``max_n`` steps, or backed off its learning rate too often."""


class FormWarning(UserWarning):
    """A fused block could not be compiled in its JAX form (an operation of the model's graph
    that PyTensor's JAX backend does not trace): the fit runs in the C form instead, with
    the same numbers, more slowly."""
