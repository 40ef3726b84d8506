"""What a backend is: the contract between the driver and the shard workers it runs.

The driver (``distvi.inference``) sees only this. A backend owns ``num_workers`` shard
workers (:class:`distvi.worker.ShardWorker`), one per contiguous shard of the rows, and
answers for all of them together; where the workers run (this process, Ray actors) is its
own business. Results are summed in rank order, so every backend gives the same numbers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class WorkerError(RuntimeError):
    """A shard worker failed, hung, or could not be started."""


@runtime_checkable
class Backend(Protocol):
    """The shard workers of a fit, seen from the driver as one."""

    #: seconds the workers computed during the last :meth:`evaluate`, the slowest worker's
    #: when they run in parallel; the rest of the call's time is transfer
    last_compute_s: float

    @property
    def num_workers(self) -> int:
        """How many shard workers there are (0 for a model without data)."""
        ...

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(datalogp[S], datagrad[S, D])`` at the points ``(S, D)`` of step ``step``: the
        sum over shards k of ``N_k / B_k`` times the log-likelihood of shard k's minibatch
        for this step and its gradient (an unbiased estimate of the full-data term; zeros
        without shards). The minibatches depend only on (seed, rank, step), so asking again
        for a step answers the same. With ``with_logp=False`` only the gradient is
        meaningful. The arrays are the caller's to keep."""
        ...

    def share(self, array: np.ndarray) -> Any:
        """``array`` as every worker reads it in :meth:`call`: sent once, not once per
        worker (the array itself where the workers share the driver's memory)."""
        ...

    def call(self, method: str, shared: tuple, per_worker: list[tuple]) -> list:
        """``worker.method(*shared, *own)`` on every shard worker, ``own`` taken from
        ``per_worker`` in rank order; the answers in rank order. ``shared`` may hold what
        :meth:`share` returned."""
        ...

    def close(self) -> None:
        """Stop the workers and free what the backend holds; calling it again does nothing."""
        ...

    def __enter__(self) -> Backend:
        """The backend, ready: its workers started."""
        ...

    def __exit__(self, *exc) -> None:
        """:meth:`close`."""
        ...
