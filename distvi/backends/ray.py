"""The Ray backend: one actor per shard, each reading its own rows.

The actor class is a plain :class:`ShardActor` (testable without Ray); ``ray.remote`` is
applied when the backend starts. The driver keeps no data: an actor reads its row range
from the source itself (arrays given in memory are put into the object store once per
shard). A restarted actor re-runs ``__init__`` and reloads its shard, and the driver sends
the step again; minibatches depend only on (seed, rank, step), so the step answers exactly
what the lost one would have.

Two paths carry a step, with identical numbers: plain actor calls (the reference) and a
Ray Compiled Graph (the fast path: shared-memory channels instead of a task per call). With
``path="auto"`` the graph is built after the workers have compiled (a plain warm-up call),
and used when it builds; after an actor dies the graph tears itself down, the step is
retried over plain calls (which wait for the restart), and the graph is rebuilt. Results
are summed on the driver in rank order, so the numbers equal the local backend's.

Start-up overlaps the driver's own work: ``start(wait=False)`` joins Ray and asks for the
actors, which load their shards and compile while the driver compiles its step; the first
call waits for them. Every failure counts against the fit's
:class:`~distvi.backends.ray_fleet.RestartBudget` (per window of steps, not per lifetime).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any

import numpy as np

from distvi.backends import ray_fleet
from distvi.backends.base import WorkerError
from distvi.backends.ray_actor import ShardActor, WorkerSpec, teardown_graph
from distvi.backends.ray_cluster import join_or_start, local_instance
from distvi.data import ArraySource, source_bounds

__all__ = ["AUTO_COMPILED_BELOW_S", "RayBackend", "ShardActor", "WorkerError", "WorkerSpec"]


# "auto" uses the compiled graph only when a step computes for less than this: its
# channels poll, which saves ~1-3 ms of transfer per step but, measured on a 2-core machine,
# slows steps whose workers compute for milliseconds (2 workers x 20,000 rows x 100: 15 ms
# per step compiled against 12 ms plain)
AUTO_COMPILED_BELOW_S = 2e-3


class _GraphTimeout(Exception):
    """A compiled-graph step did not finish in time."""


class _Died(Exception):
    """Worker ``rank`` died during a call (Ray restarts it)."""

    def __init__(self, rank: int, err: BaseException) -> None:
        super().__init__(rank)
        self.rank, self.err = rank, err


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
    max_restarts, restart_window
        The restart budget: worker failures allowed within any ``restart_window`` steps
        (each dead worker is restarted by Ray, on another node when its own is gone).
    timeout_s
        Seconds a step may take before the worker is declared hung.
    placement_timeout_s
        Seconds to wait for the placement group.
    startup_timeout_s
        Seconds a worker may take to load its shard and compile.
    actor_class
        The actor's class (a :class:`ShardActor` subclass); for tests and instrumentation.
    label
        What the workers are for, in notices and errors (e.g. the inference's class).
    path
        ``"auto"`` (the compiled graph when a step's compute, timed on warm-up calls, is
        short, else plain calls; plain calls too when the graph cannot be built), ``"plain"``
        or ``"compiled"`` (fail if the graph cannot be built).
    """

    name = "ray"

    def __init__(self, spec: WorkerSpec, source: Any, num_workers: int, address: str | None = None,
                 num_cpus: float = 1.0, max_restarts: int = 3, timeout_s: float = 300.0,
                 placement_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 actor_class: type | None = None, path: str = "auto", restart_window: int = 100,
                 label: str = "a fit") -> None:
        if path not in ("auto", "plain", "compiled"):
            raise ValueError(f"path must be 'auto', 'plain' or 'compiled', got {path!r}")
        self.budget = ray_fleet.RestartBudget(max_restarts, restart_window)
        self.path = path
        self.compute_s: float | None = None
        self._cdag = None
        self._rebuild = False
        self.spec, self.source, self.k = spec, source, num_workers
        self.n_rows = source.n_rows
        self.address, self.label = address, label
        self.num_cpus = float(num_cpus)
        self.timeout_s, self.placement_timeout_s = float(timeout_s), float(placement_timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.actor_class = ShardActor if actor_class is None else actor_class
        self.actors: list = []
        self._pg = None
        self._pending = False  # actors asked for, not yet known to be ready
        self._busy = 0
        self.released = False  # workers let go while idle; started again on next use
        self.last_compute_s = 0.0
        self._last_step = 0
        self._refs: list = []

    @property
    def num_workers(self) -> int:
        return self.k

    @property
    def cpus(self) -> float:
        return self.k * self.num_cpus

    @property
    def holds_workers(self) -> bool:
        return bool(self.actors)

    @property
    def busy(self) -> bool:
        return self._busy > 0

    @contextlib.contextmanager
    def held(self):
        """While inside: the workers are in use (another fit of this process may not take
        them); started again first if they were released."""
        self.start()
        self._busy += 1
        try:
            yield self
        finally:
            self._busy -= 1

    def start(self, wait: bool = True) -> RayBackend:
        """Join or start Ray, place one actor per shard, load the shards; with ``wait=False``
        return once the actors are asked for (the first call waits for them)."""
        import ray

        if self.actors:  # already started (or starting)
            if wait:
                self._await()
            return self
        if not ray.is_initialized():
            join_or_start(self.address)
        try:
            self._place()
            self._launch()
            self._pending = True
            if wait:
                self._await()
        except BaseException:
            self.close()
            raise
        self.released = False
        ray_fleet.register(self)
        return self

    def _place(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        need, total = self.cpus, ray.cluster_resources().get("CPU", 0.0)
        if ray.available_resources().get("CPU", 0.0) < need:
            ray_fleet.release_idle(self)
        # a local instance has no more CPUs to come: fail now when the fits still running
        # here leave too few
        if local_instance() and total - ray_fleet.busy_cpus(self) < need:
            raise WorkerError(ray_fleet.full_message(self, total))
        self._pg = placement_group([{"CPU": self.num_cpus}] * self.k, strategy="SPREAD")

    def _launch(self) -> None:
        import ray

        self._actor_cls = ray.remote(self.actor_class)
        # in-memory arrays go to the object store once per shard; any other source is
        # read by the actors themselves (the driver holds only its description)
        in_memory = isinstance(self.source, ArraySource)
        spec = WorkerSpec(self.spec.data_term, None if in_memory else self.source,
                          self.spec.seed, self.spec.batch_size, self.spec.n_points,
                          self.spec.with_logp)
        # the driver keeps these references: a replacement worker is built from them
        self._refs = [ray.put(spec)]
        self._bounds = source_bounds(self.source, self.k)
        for a, b in self._bounds:
            self._refs.append(ray.put(self.source.read(a, b)) if in_memory else None)
        self.actors = [self._new_actor(rank) for rank in range(self.k)]

    def _new_actor(self, rank: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        a, b = self._bounds[rank]
        return self._actor_cls.options(
            num_cpus=self.num_cpus,
            # the driver replaces a dead worker itself (its bundle moves to a live node when
            # its own is gone) and budgets failures per window of steps, not per lifetime
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=rank),
        ).remote(self._refs[0], rank, a, b, self._refs[rank + 1])

    def _replace(self, rank: int) -> None:
        """A new worker for shard ``rank`` in place of a dead one, loaded and compiled."""
        import ray

        self._teardown_graph()  # the graph holds the dead actor: rebuilt at the next step
        self._rebuild = self.path != "plain"
        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[rank] = self._new_actor(rank)
        self._started([self.actors[rank]], [rank])

    def _started(self, actors: list, ranks: list) -> None:
        """Wait until ``actors`` have loaded their shards and compiled; one that dies doing
        so (a shard it cannot read, say) ends the start with its error."""
        try:
            # loading a shard and compiling take longer than a step: their own timeout
            self._get([a.n_rows.remote() for a in actors], step=None,
                      timeout=max(self.timeout_s, self.startup_timeout_s))
        except _Died as died:
            raise WorkerError(f"worker {ranks[died.rank]} died while starting (loading its shard "
                              f"and compiling): {died.err}") from None

    def _await(self) -> None:
        """Wait for the actors asked for by :meth:`start`: placed, loaded, compiled."""
        if not self._pending:
            return
        import ray

        try:
            ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
            if not ready:
                raise WorkerError(ray_fleet.full_message(
                    self, ray.cluster_resources().get("CPU", 0.0), self.placement_timeout_s))
            self._started(self.actors, list(range(self.k)))
            self._pending = False
            if self.path == "auto":
                ndim = self.spec.data_term.z.type.shape[0]
                points = np.zeros((self.spec.n_points, ndim))
                self.compute_s = min(max(a[2] for a in self._plain(points, 0, self.spec.with_logp))
                                     for _ in range(3))
                if self.compute_s >= AUTO_COMPILED_BELOW_S:
                    self.path = "plain"
            if self.path != "plain":
                self._build_graph()
        except BaseException:
            self.close()
            raise

    def release(self) -> None:
        """Let the workers go while idle (Ray stays up); :meth:`start` brings them back."""
        self._stop_workers()
        self.released = True

    def _get(self, refs, step: int | None, timeout: float | None = None, what: str = "answer"):
        """Every answer, in order; a worker that died raises :class:`_Died` (it is being
        restarted), any other failure a :class:`WorkerError`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        answers = []
        for rank, ref in enumerate(refs):
            try:
                answers.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0)))
            except GetTimeoutError:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                hung = [r for r, ref in enumerate(refs) if ref not in ready]
                what = "start (load the shard and compile)" if step is None else f"{what} step {step}"
                raise WorkerError(f"worker(s) {hung} did not {what} within {timeout:.0f} s") from None
            except RayActorError as err:
                raise _Died(rank, err) from None
            except RayTaskError as err:
                raise WorkerError(f"a worker failed at step {step}: {err.cause!r}") from None
        return answers

    def _call_all(self, method: str, args: list[tuple], step: int | None, what: str = "answer"):
        """``method`` on every worker; a worker found dead counts against the restart
        budget, is replaced, and the call is sent again."""
        while True:
            refs = [getattr(a, method).remote(*own) for a, own in zip(self.actors, args)]
            try:
                return self._get(refs, step, what=what)
            except _Died as died:
                self._failed(step, died.rank, "died", died.err)
                self._replace(died.rank)

    def _failed(self, step: int | None, rank: int, what: str, err=None) -> None:
        """Count a failure; past the budget, stop the workers and raise the budget's error."""
        try:
            self.budget.record(step, rank, what)
        except WorkerError as gave_up:
            self._stop_workers()  # nothing of the graph or the actors is left for exit
            last = f" The last failure: {str(err).splitlines()[0]}" if err is not None else ""
            raise WorkerError(f"{gave_up}.{last}") from None

    def _plain(self, points: np.ndarray, step: int, with_logp: bool):
        return self._call_all("evaluate", [(points, step, with_logp)] * self.k, step)

    # ------------------------------------------------------------------ compiled graph
    def _build_graph(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        # the graph's set-up and teardown narrate at INFO level; a run's output keeps to the run
        logging.getLogger("ray.dag.compiled_dag_node").setLevel(logging.WARNING)
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
        teardown_graph(self._cdag)
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
            answers.append((np.array(answer[0]), np.array(answer[1]), *answer[2:]))
        return answers

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Sum over shards, in rank order, of the scaled minibatch answers."""
        self._last_step = step
        if self._pending or not self.actors:
            self.start()
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
            answers = self._plain(points, step, with_logp)

        logp = np.array(answers[0][0])  # results from Ray are read-only: copy, then add
        grad = np.array(answers[0][1])
        for lp, g, *_ in answers[1:]:
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
        if self._pending or not self.actors:
            self.start()
        return self._call_all(method, [(*shared, *own) for own in per_worker], self._last_step,
                              what=f"answer {method} for")

    def pids(self) -> list[int]:
        """The actors' process ids (a plain call: allowed while a compiled graph runs)."""
        self.start()
        return self._call_all("pid", [()] * self.k, None)

    @property
    def compiled(self) -> bool:
        """Whether steps currently go through the compiled graph."""
        return self._cdag is not None

    def _stop_workers(self) -> None:
        import ray

        self._pending = False
        if not ray.is_initialized():
            self.actors, self._refs, self._pg, self._cdag = [], [], None, None
            return
        self._teardown_graph()
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
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

    def close(self) -> None:
        """Stop the actors and the placement group. A local Ray instance distvi started stays
        up for this process's next fit (it stops at exit, or on SIGTERM)."""
        self._stop_workers()
        self.released = False
        ray_fleet.unregister(self)

    def __enter__(self) -> RayBackend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
