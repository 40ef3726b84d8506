"""What changes during a run, as plain values: :class:`DriverState`."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from distvi.optimizers import OptState


class DriverState(NamedTuple):
    """Everything that changes during a run, as plain arrays and ints.

    ``step`` counts every step of the run and keys the workers' minibatches; ``opt_step``
    counts the steps of the current optimizer (the argument of a learning-rate schedule);
    ``draw_position`` is where the driver's normal stream stands; ``average`` is the mean of
    the last ``n_averaged`` iterates of the parameters (Polyak-Ruppert averaging).
    """

    params: tuple[np.ndarray, ...]
    opt_state: OptState
    step: int
    opt_step: int
    draw_position: int
    average: tuple[np.ndarray, ...] = ()
    n_averaged: int = 0

    @classmethod
    def fresh(cls, optimizer, params, previous: DriverState | None = None) -> DriverState:
        """A fresh ``optimizer`` at ``params``; the run's step and stream position go on from
        ``previous``."""
        params = tuple(np.array(v, dtype="float64") for v in params)
        return cls(params, optimizer.init_state([np.shape(p) for p in params]),
                   0 if previous is None else previous.step, 0,
                   0 if previous is None else previous.draw_position)

    @property
    def result(self) -> tuple[np.ndarray, ...]:
        """The parameters a fit returns: the average once averaging has begun, else the
        last iterate."""
        return self.average if self.n_averaged else self.params
