"""The local backend: the shards live in the driver's process.

The reference every other backend is compared with: same workers, same summation order.
"""

from __future__ import annotations

import numpy as np

from distvi.worker import ShardWorker


class LocalBackend:
    """Shard workers in this process, summed in rank order."""

    name = "local"

    def __init__(self, workers: list[ShardWorker]) -> None:
        self.workers = workers

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def evaluate(self, points: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Sum over shards of the scaled minibatch log-likelihood and its gradient."""
        logp, grad = self.workers[0].evaluate(points, step)
        if len(self.workers) == 1:
            return logp, grad
        logp, grad = logp.copy(), grad.copy()
        for w in self.workers[1:]:
            lp, g = w.evaluate(points, step)
            logp += lp
            grad += g
        return logp, grad

    def stein_rows(self, kernel, points, grads, h, temperature, bounds) -> list[np.ndarray]:
        """Each worker's slice of the Stein direction, in rank order."""
        return [w.stein_rows(kernel, points, grads, h, temperature, lo, hi)
                for w, (lo, hi) in zip(self.workers, bounds)]

    def close(self) -> None:
        self.workers = []

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
