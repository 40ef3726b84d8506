"""The full data, reached through a fit's shard workers: what an approximation evaluates its
full-data log-likelihood and row-wise deterministics with (``approx.diagnose()``,
``approx.sample()``), without copying the rows to the driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class ShardData:
    """The rows of ``source`` as the fit's shard workers hold them.

    ``start()`` returns the fit's backend, starting its workers when they are not running;
    ``started()`` says whether they are; ``stop()`` releases them (workers started only for
    one evaluation are released after it). ``record_diagnosis(diagnosis)`` records a
    diagnostic where the fit was recorded; ``cost_divisor()`` is ``N / B``, all the rows over
    the rows a step evaluates.
    """

    def __init__(self, source: Any, has_data: bool, num_workers: int, start: Callable,
                 started: Callable[[], bool], stop: Callable[[], None],
                 record_diagnosis: Callable[[Any], None], cost_divisor: Callable[[], float]) -> None:
        self.source, self.has_data, self.num_workers = source, has_data, num_workers
        self._start, self._started, self._stop = start, started, stop
        self.record_diagnosis, self.cost_divisor = record_diagnosis, cost_divisor

    @property
    def n_rows(self) -> int:
        return getattr(self.source, "n_rows", 0) if self.has_data else 0

    def _on_whole_shards(self, method: str, points: np.ndarray, *before) -> list:
        """``worker.method(*before, points)`` on every shard worker, over its whole shard."""
        was_open = self._started()
        backend = self._start()
        try:
            shared = backend.share(np.ascontiguousarray(points, dtype="float64"))
            return backend.call(method, (*before, shared), [()] * self.num_workers)
        finally:
            if not was_open:
                self._stop()

    def logp(self, points: np.ndarray) -> np.ndarray:
        """The log-likelihood of all the rows at each flat point (S, D): every shard worker
        sums its whole shard (no minibatch)."""
        if not self.has_data:
            return np.zeros(np.shape(points)[0])
        return np.sum(self._on_whole_shards("full_logp", points), axis=0)

    def deterministics(self, term, points: np.ndarray) -> list[np.ndarray]:
        """The row-wise deterministics of ``term`` at each flat point (S, D), computed by the
        shard workers on their whole shards and joined in row order: (S, N, ...) each."""
        parts = self._on_whole_shards("deterministics", points, term)
        return [np.concatenate([p[i] for p in parts], axis=1) for i in range(len(term.names))]
