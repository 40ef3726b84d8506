"""What goes wrong when a PyMC model is adapted: errors the model modules share."""

from __future__ import annotations

try:
    from pymc.variational.opvi import ParametrizationError as _PyMCParametrizationError
except ImportError:  # pragma: no cover
    _PyMCParametrizationError = ValueError


class ModelError(ValueError):
    """The model cannot be fitted by distvi as written."""


class DiscreteVariableError(ModelError, _PyMCParametrizationError):
    """A discrete free variable: also PyMC's ``ParametrizationError``, which PyMC raises for it."""


class ModelFactoryError(RuntimeError):
    """The user's model factory raised while building the model."""
