"""The Ray backend: one actor per shard, each reading its own rows.

The actor class is a plain :class:`ShardActor` (testable without Ray); ``ray.remote`` is
applied when the backend starts. The driver keeps no data: an actor reads its row range
from the source itself (arrays given in memory are put into the object store once per
shard). A restarted actor re-runs ``__init__``, reloads its shard, and the step is retried;
minibatches depend only on (seed, rank, step), so the retried step answers exactly what
the lost one would have.

Two paths carry a step, with identical numbers: plain actor calls (the reference) and a
Ray Compiled Graph (the fast path: shared-memory channels instead of a task per call). With
``path="auto"`` the graph is built after the workers have compiled (a plain warm-up call),
and used when it builds; after an actor dies the graph tears itself down, the step is
retried over plain calls (which wait for the restart), and the graph is rebuilt. Results
are summed on the driver in rank order, so the numbers equal the local backend's.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from distvi.backends.base import WorkerError
from distvi.backends.ray_cluster import join_or_start
from distvi.data import ArraySource, source_bounds
from distvi.worker import ShardWorker, compiled_by_points

__all__ = ["AUTO_COMPILED_BELOW_S", "RayBackend", "ShardActor", "WorkerError", "WorkerSpec"]


# "auto" uses the compiled graph only when a step computes for less than this: its
# channels poll, which saves ~1-3 ms of transfer per step but, measured on a 2-core machine,
# slows steps whose workers compute for milliseconds (2 workers x 20,000 rows x 100: 15 ms
# per step compiled against 12 ms plain)
AUTO_COMPILED_BELOW_S = 2e-3


class _GraphTimeout(Exception):
    """A compiled-graph step did not finish in time."""


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


class RayBackend:
    """Shard workers as Ray actors, spread over the cluster's nodes.

    Parameters
    ----------
    spec
        What every worker builds from.
    source, num_workers
        The shards are ``source_bounds(source, num_workers)`` (chunk-aligned for Zarr).
    address
        The cluster to join (default: ``RAY_ADDRESS``, else a new local instance).
    num_cpus
        CPUs reserved per worker.
    max_restarts
        Restarts allowed per worker after it dies.
    timeout_s
        Seconds a step may take before the worker is declared hung.
    placement_timeout_s
        Seconds to wait for the placement group.
    startup_timeout_s
        Seconds a worker may take to load its shard and compile.
    actor_class
        The actor's class (a :class:`ShardActor` subclass); for tests and instrumentation.
    path
        ``"auto"`` (the compiled graph when a step's compute, timed on warm-up calls, is
        short, else plain calls; plain calls too when the graph cannot be built), ``"plain"``
        or ``"compiled"`` (fail if the graph cannot be built).
    """

    name = "ray"

    def __init__(self, spec: WorkerSpec, source: Any, num_workers: int, address: str | None = None,
                 num_cpus: float = 1.0, max_restarts: int = 3, timeout_s: float = 300.0,
                 placement_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 actor_class: type | None = None, path: str = "auto") -> None:
        if path not in ("auto", "plain", "compiled"):
            raise ValueError(f"path must be 'auto', 'plain' or 'compiled', got {path!r}")
        self.path = path
        self.compute_s: float | None = None
        self._cdag = None
        self._rebuild = False
        self.spec, self.source, self.k = spec, source, num_workers
        self.n_rows = source.n_rows
        self.address = address
        self.num_cpus, self.max_restarts = float(num_cpus), int(max_restarts)
        self.timeout_s, self.placement_timeout_s = float(timeout_s), float(placement_timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.actor_class = ShardActor if actor_class is None else actor_class
        self.actors: list = []
        self._started_ray = False
        self._pg = None
        self.last_compute_s = 0.0
        self._last_step = 0
        self._refs: list = []

    @property
    def num_workers(self) -> int:
        return self.k

    def start(self) -> RayBackend:
        """Join or start Ray, place one actor per shard, load the shards."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.actors:  # already started
            return self
        if not ray.is_initialized():
            self._started_ray = join_or_start(self.address)
        try:
            self._pg = placement_group([{"CPU": self.num_cpus}] * self.k, strategy="SPREAD")
            ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
            if not ready:
                raise WorkerError(
                    f"could not place {self.k} workers with {self.num_cpus} CPU each within "
                    f"{self.placement_timeout_s:.0f} s; the cluster has {ray.cluster_resources().get('CPU', 0)} CPUs"
                )
            actor_cls = ray.remote(self.actor_class)
            # in-memory arrays go to the object store once per shard; any other source is
            # read by the actors themselves (the driver holds only its description)
            in_memory = isinstance(self.source, ArraySource)
            spec = WorkerSpec(self.spec.data_term, None if in_memory else self.source,
                              self.spec.seed, self.spec.batch_size, self.spec.n_points,
                              self.spec.with_logp)
            spec_ref = ray.put(spec)
            # the driver keeps these references: a restarted actor re-runs __init__ with them
            self._refs = [spec_ref]
            for rank, (a, b) in enumerate(source_bounds(self.source, self.k)):
                rows = ray.put(self.source.read(a, b)) if in_memory else None
                self._refs.append(rows)
                self.actors.append(actor_cls.options(
                    num_cpus=self.num_cpus,
                    max_restarts=self.max_restarts,
                    max_task_retries=-1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self._pg, placement_group_bundle_index=rank),
                ).remote(spec_ref, rank, a, b, rows))
            # loading a shard and compiling take longer than a step: their own timeout
            self._get([a.n_rows.remote() for a in self.actors], step=None,
                      timeout=max(self.timeout_s, self.startup_timeout_s))
            if self.path == "auto":
                ndim = self.spec.data_term.z.type.shape[0]
                points = np.zeros((self.spec.n_points, ndim))
                self.compute_s = min(
                    max(a[2] for a in self._get([w.evaluate.remote(points, 0, self.spec.with_logp)
                                                 for w in self.actors], 0))
                    for _ in range(3))
                if self.compute_s >= AUTO_COMPILED_BELOW_S:
                    self.path = "plain"
            if self.path != "plain":
                self._build_graph()
        except BaseException:
            self.close()
            raise
        return self

    def _get(self, refs, step: int | None, timeout: float | None = None, what: str = "answer"):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.timeout_s if timeout is None else timeout
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            hung = [r for r, ref in enumerate(refs) if ref not in ready]
            what = "start (load the shard and compile)" if step is None else f"{what} step {step}"
            raise WorkerError(f"worker(s) {hung} did not {what} within {timeout:.0f} s") from None
        except RayActorError as err:
            raise WorkerError(f"a worker died and could not be restarted (step {step}): {err}") from None
        except RayTaskError as err:
            raise WorkerError(f"a worker failed at step {step}: {err.cause!r}") from None

    # ------------------------------------------------------------------ compiled graph
    def _build_graph(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        try:
            with InputNode() as inp:
                dag = MultiOutputNode([a.evaluate.bind(inp[0], inp[1], inp[2]) for a in self.actors])
            self._cdag = dag.experimental_compile()
        except Exception as err:
            self._cdag = None
            if self.path == "compiled":
                raise WorkerError(f"could not build the compiled graph: {err}") from err
            warnings.warn(f"compiled graph unavailable, using plain actor calls: {err}",
                          RuntimeWarning, stacklevel=2)
            self.path = "plain"

    def _teardown_graph(self) -> None:
        if self._cdag is not None:
            try:
                self._cdag.teardown()
            except Exception:  # an actor already gone takes the graph with it
                pass
            self._cdag = None

    def _evaluate_compiled(self, points: np.ndarray, step: int, with_logp: bool):
        import ray
        from ray.exceptions import RayChannelTimeoutError

        refs = self._cdag.execute(points, step, with_logp)
        deadline = time.monotonic() + self.timeout_s
        answers = []
        for ref in refs:
            try:
                answer = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
            except (RayChannelTimeoutError, TimeoutError):
                # the graph's outputs arrive together, so the hung worker is not known here;
                # the caller retries the step over plain calls, which name it (or succeed)
                raise _GraphTimeout from None
            # zero-copy views into the graph's channel: copy before the next execution
            answers.append((np.array(answer[0]), np.array(answer[1]), answer[2]))
        return answers

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Sum over shards, in rank order, of the scaled minibatch answers."""
        self._last_step = step
        if self._rebuild and self._cdag is None:
            self._rebuild = False
            self._build_graph()
        answers = None
        if self._cdag is not None:
            try:
                answers = self._evaluate_compiled(points, step, with_logp)
            except Exception:
                # an actor died or hung: the graph is gone; retry this step over plain calls
                # (they wait for a restart, and name a worker that hangs again) and rebuild
                # the graph for the next step
                self._teardown_graph()
                self._rebuild = True
        if answers is None:
            # points are small: passed inline (a ray.put per step doubles the round trip)
            answers = self._get([a.evaluate.remote(points, step, with_logp) for a in self.actors], step)

        logp = np.array(answers[0][0])  # results from Ray are read-only: copy, then add
        grad = np.array(answers[0][1])
        for lp, g, _ in answers[1:]:
            logp += lp
            grad += g
        self.last_compute_s = max(a[2] for a in answers)
        return logp, grad

    @staticmethod
    def share(array: np.ndarray):
        """An array every worker reads from the object store (put once, not once per worker)."""
        import ray

        return ray.put(array)

    def call(self, method: str, shared: tuple, per_worker: list[tuple]) -> list:
        """``worker.method(*shared, *own)`` on every worker as plain actor calls, in rank
        order (``shared`` may hold :meth:`share` references)."""
        refs = [getattr(actor, method).remote(*shared, *own)
                for actor, own in zip(self.actors, per_worker)]
        return self._get(refs, self._last_step, what=f"answer {method} for")

    def pids(self) -> list[int]:
        """The actors' process ids (a plain call: allowed while a compiled graph runs)."""
        return self._get([a.pid.remote() for a in self.actors], step=None)

    @property
    def compiled(self) -> bool:
        """Whether steps currently go through the compiled graph."""
        return self._cdag is not None

    def close(self) -> None:
        """Stop the actors and the placement group; shut Ray down only if it was started here."""
        import ray

        if not ray.is_initialized():
            return
        self._teardown_graph()
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        self._refs = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayBackend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
