"""What a shard worker does: log-likelihood and its gradient at given points, on its minibatch.

A worker knows nothing of the approximation. It holds one contiguous shard of the rows in
memory and answers ``evaluate(points[S, D], step) -> (datalogp[S], grad[S, D])``, scaled by
``N_k / B_k`` so that the sum over workers estimates the full-data term without bias.

Minibatches without a gather: at load the shard is shuffled once (a permutation drawn from
the worker's stream) and its first ``B_k`` rows are appended at the end; a step's minibatch
is the window of ``B_k`` rows starting at a uniform random offset in ``[0, N_k)``. Every row
is in a step's minibatch with probability ``B_k / N_k``, so the scaled estimate is unbiased,
and the window is a view: no rows are copied per step. The offset comes from a stream
addressed by (run seed, rank, step) only, so a retried step returns exactly what the lost
one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from distvi._rng import Stream

DataTerm = Callable[..., list[np.ndarray]]
OFFSET_BLOCK = 1024


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
        arrays = [np.asarray(a) for a in rows.values()]
        self.n_rows = int(arrays[0].shape[0])
        self.rank = rank
        self.full = batch_size is None or batch_size >= self.n_rows
        self.batch_size = self.n_rows if self.full else int(batch_size)
        self.scale = np.array(self.n_rows / self.batch_size, dtype="float64")
        self._stream = Stream(seed, rank + 1)
        self._data_term = data_term
        self._block, self._offsets = -1, []
        if self.full:
            self.rows = [np.ascontiguousarray(a) for a in arrays]
        else:
            # the shuffle is drawn once, before any step, from the worker's own key
            perm = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence(seed, spawn_key=(rank + 1, 0)))).permutation(self.n_rows)
            wrap = np.concatenate([perm, perm[: self.batch_size]])
            self.rows = [np.ascontiguousarray(np.take(a, wrap, axis=0)) for a in arrays]

    def minibatch(self, step: int) -> list[np.ndarray]:
        """The rows of ``step``'s minibatch: a window of the shuffled shard (views, no copy)."""
        if self.full:
            return self.rows
        block, j = divmod(step, OFFSET_BLOCK)
        if block != self._block:
            # offsets for a block of steps in one draw; position-addressed, so identical to
            # drawing them one step at a time
            self._offsets = self._stream.integers(self.n_rows, OFFSET_BLOCK, block * OFFSET_BLOCK).tolist()
            self._block = block
        start = self._offsets[j]
        stop = start + self.batch_size
        return [a[start:stop] for a in self.rows]

    def evaluate(self, points: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Scaled minibatch log-likelihood and its gradient at each point."""
        fn = self._data_term(points.shape[0])
        logp, grad = fn(points, *self.minibatch(step), self.scale)
        return logp, grad

    @staticmethod
    def stein_rows(kernel, points: np.ndarray, grads: np.ndarray, h: float, temperature: float,
                   lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of the Stein direction (the driver fixed the bandwidth ``h``)."""
        return kernel.phi_rows(points, grads, h, temperature, lo, hi)


def compiled_by_points(data_term) -> Callable[[int], DataTerm]:
    """``f(n_points)``: the data term compiled once per number of points, then reused."""
    cache: dict[int, DataTerm] = {}

    def get(n_points: int) -> DataTerm:
        if n_points not in cache:
            cache[n_points] = data_term.compile(n_points)
        return cache[n_points]

    return get
