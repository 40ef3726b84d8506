"""What a shard worker does: log-likelihood and its gradient at given points, on its minibatch.

A worker knows nothing of the approximation. It holds one contiguous shard of the rows in
memory and answers ``evaluate(points[S, D], step) -> (datalogp[S], grad[S, D])``, scaled by
``N_k / B_k`` so that the sum over workers estimates the full-data term without bias. The
minibatch rows come from a stream addressed by (run seed, rank, step) only, so a retried
step returns exactly what the lost one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from distvi._rng import Stream

DataTerm = Callable[..., list[np.ndarray]]


class ShardWorker:
    """One shard of rows and the compiled data term.

    Parameters
    ----------
    rows
        The shard's arrays, by name, in the order the data term takes them.
    rank
        The shard's index; it keys the minibatch stream.
    seed
        The run seed.
    batch_size
        Rows per minibatch; ``None``, or at least the shard's rows, uses the whole shard
        (an exact gradient).
    data_term
        ``data_term(n_points)`` returns the compiled ``f(points, *rows, scale)``.
    """

    def __init__(
        self,
        rows: Mapping[str, np.ndarray],
        rank: int,
        seed: int,
        batch_size: int | None,
        data_term: Callable[[int], DataTerm],
    ) -> None:
        self.rows = [np.ascontiguousarray(a) for a in rows.values()]
        self.n_rows = int(self.rows[0].shape[0])
        self.rank = rank
        self.full = batch_size is None or batch_size >= self.n_rows
        self.batch_size = self.n_rows if self.full else int(batch_size)
        self.scale = np.array(self.n_rows / self.batch_size, dtype="float64")
        self._stream = Stream(seed, rank + 1)
        self._data_term = data_term

    def minibatch(self, step: int) -> list[np.ndarray]:
        """The rows of ``step``'s minibatch (drawn with replacement, as pm.Minibatch does)."""
        if self.full:
            return self.rows
        idx = self._stream.integers(self.n_rows, self.batch_size, step * self.batch_size)
        return [np.take(a, idx, axis=0) for a in self.rows]

    def evaluate(self, points: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Scaled minibatch log-likelihood and its gradient at each point."""
        fn = self._data_term(points.shape[0])
        logp, grad = fn(points, *self.minibatch(step), self.scale)
        return logp, grad
