"""What runs inside a Ray actor: one shard's worker (a plain class, testable without Ray;
``ray.remote`` is applied when the backend starts) and the spec it is built from."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from distvi.local_worker import shard_worker
from distvi.worker import compiled_by_points

__all__ = ["ShardActor", "WorkerSpec"]


@dataclass
class WorkerSpec:
    """Everything an actor needs to build its worker (pickled to it once)."""

    data_term: Any          # distvi.model_terms.DataTerm: a symbolic graph, no data
    source: Any = None      # a Source the actor reads; None when rows come from the object store
    seed: int = 0
    batch_size: int | None | tuple = None  # rows per step: for every shard, or one per rank
    n_points: int = 1       # compiled in __init__ so the first step does not pay for it
    with_logp: bool = True  # the variant compiled in __init__
    compiler: dict | None = None  # the driver's findings (distvi._compile.compiler_facts)
    local_states: tuple | None = None  # with local variables: what each rank held before


class ShardActor:
    """One shard's worker inside an actor process."""

    def __init__(self, spec: WorkerSpec, rank: int, start: int, stop: int, rows: Any = None,
                 local_state: dict | None = None) -> None:
        from distvi._compile import adopt_compiler_facts

        adopt_compiler_facts(spec.compiler)
        data_term = compiled_by_points(spec.data_term)
        if rows is None:
            rows = spec.source.read(start, stop)
        batch = spec.batch_size[rank] if isinstance(spec.batch_size, tuple) else spec.batch_size
        state = local_state  # a snapshot, else what the spec says the rank held
        if state is None and spec.local_states is not None:
            state = spec.local_states[rank]
        self.worker = shard_worker(rows, rank, spec.seed, batch, data_term, state)
        self.worker.warm(spec.n_points, spec.with_logp)
        # steps come over plain calls (the actor's thread) or the direct line (its own
        # thread): one at a time, so a step retried after a timeout waits for the first
        self._lock = threading.Lock()
        self._line = None

    def evaluate(self, points: np.ndarray, step: int, with_logp: bool = True):
        """The worker's answer and the seconds it computed (the rest of a call is transfer)."""
        with self._lock:
            t0 = time.perf_counter()
            logp, grad = self.worker.evaluate(points, step, with_logp)
            return logp, grad, time.perf_counter() - t0

    def listen(self, token: bytes, host: str | None = None) -> tuple:
        """Open (once) the direct line steps may come over, for the driver that presents
        ``token`` (the latest one given); its (host, port)."""
        from distvi.backends.ray_paths import Line

        if self._line is None:
            if host is None:
                try:
                    import ray

                    host = ray.util.get_node_ip_address()
                except Exception:  # outside Ray
                    host = "127.0.0.1"
            self._line = Line(self.evaluate, token, host)
        self._line.token = bytes(token)
        return self._line.address

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

    def local_begin(self, *args):
        return self.worker.local_begin(*args)

    def local_draws(self, *args):
        return self.worker.local_draws(*args)

    def write_local_draws(self, *args):
        return self.worker.write_local_draws(*args)

    def local_state(self):
        with self._lock:  # not between a step's halves on the direct line's thread
            return self.worker.local_state()

    def pid(self) -> int:
        return os.getpid()

    def n_rows(self) -> int:
        return self.worker.n_rows

