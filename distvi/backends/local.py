"""The local backend: the shards live in the driver's process.

The reference every other backend is compared with: same workers, same summation order.
"""

from __future__ import annotations

import time

import numpy as np

from distvi.worker import ShardWorker


class LocalBackend:
    """Shard workers in this process, summed in rank order."""

    name = "local"

    def __init__(self, workers: list[ShardWorker]) -> None:
        self.workers = workers
        # all of an in-process call is compute: timed as the caller times the call
        self.last_compute_s = 0.0

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Sum over shards of the scaled minibatch log-likelihood and its gradient (zeros
        for a model without data, which has no shards)."""
        t0 = time.perf_counter()
        logp, grad = self._sum(points, step, with_logp)
        self.last_compute_s = time.perf_counter() - t0
        return logp, grad

    def _sum(self, points: np.ndarray, step: int, with_logp: bool):
        if not self.workers:
            return np.zeros(points.shape[0]), np.zeros_like(points)
        logp, grad = self.workers[0].evaluate(points, step, with_logp)
        if len(self.workers) == 1:
            return logp, grad
        logp, grad = logp.copy(), grad.copy()
        for w in self.workers[1:]:
            lp, g = w.evaluate(points, step, with_logp)
            logp += lp
            grad += g
        return logp, grad

    def fused_rows(self) -> list:
        """The shards as a fused block reads them (see :mod:`distvi.driver.fused`)."""
        from distvi.driver.fused import ShardRows

        return [ShardRows(w.rows, None if w.full else w.batch_size, float(w.scale), w.offsets,
                          w.device_rows) for w in self.workers]

    @staticmethod
    def share(array: np.ndarray) -> np.ndarray:
        """The array itself: the workers share the driver's memory."""
        return array

    def call(self, method: str, shared: tuple, per_worker: list[tuple]) -> list:
        """``worker.method(*shared, *own)`` on every worker, in rank order."""
        return [getattr(w, method)(*shared, *own) for w, own in zip(self.workers, per_worker)]

    def start(self, wait: bool = True) -> LocalBackend:
        return self  # its workers live in this process from the start

    def close(self) -> None:
        self.workers = []

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
