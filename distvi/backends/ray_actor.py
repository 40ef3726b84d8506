"""What runs inside a Ray actor: one shard's worker (a plain class, testable without Ray;
``ray.remote`` is applied when the backend starts) and the spec it is built from."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from distvi.worker import ShardWorker, compiled_by_points

__all__ = ["ShardActor", "WorkerSpec", "teardown_graph"]


@dataclass
class WorkerSpec:
    """Everything an actor needs to build its worker (pickled to it once)."""

    data_term: Any          # distvi.model_terms.DataTerm: a symbolic graph, no data
    source: Any = None      # a Source the actor reads; None when rows come from the object store
    seed: int = 0
    batch_size: int | None | tuple = None  # rows per step: for every shard, or one per rank
    n_points: int = 1       # compiled in __init__ so the first step does not pay for it
    with_logp: bool = True  # the variant compiled in __init__


class ShardActor:
    """One shard's worker inside an actor process."""

    def __init__(self, spec: WorkerSpec, rank: int, start: int, stop: int, rows: Any = None) -> None:
        data_term = compiled_by_points(spec.data_term)
        if rows is None:
            rows = spec.source.read(start, stop)
        batch = spec.batch_size[rank] if isinstance(spec.batch_size, tuple) else spec.batch_size
        self.worker = ShardWorker(rows, rank, spec.seed, batch, data_term)
        ndim = spec.data_term.z.type.shape[0]
        self.worker.evaluate(np.zeros((spec.n_points, ndim)), 0, spec.with_logp)

    def evaluate(self, points: np.ndarray, step: int, with_logp: bool = True):
        """The worker's answer and the seconds it computed (the rest of a call is transfer)."""
        t0 = time.perf_counter()
        logp, grad = self.worker.evaluate(points, step, with_logp)
        return logp, grad, time.perf_counter() - t0

    def full_logp(self, *args):
        return self.worker.full_logp(*args)

    def full_logp_grad(self, *args):
        return self.worker.full_logp_grad(*args)

    def deterministics(self, *args):
        return self.worker.deterministics(*args)

    def stein_sample(self, *args):
        return self.worker.stein_sample(*args)

    def stein_bracket(self, *args):
        return self.worker.stein_bracket(*args)

    def stein_rows(self, *args):
        return self.worker.stein_rows(*args)

    def pid(self) -> int:
        return os.getpid()

    def n_rows(self) -> int:
        return self.worker.n_rows


def teardown_graph(cdag) -> None:
    """Tear a compiled graph down; a graph whose actor is already gone went with it."""
    if cdag is not None:
        try:
            cdag.teardown()
        except Exception:
            pass
