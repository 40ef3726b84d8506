"""The Ray backend: one actor per shard, each reading its own rows.

The actor class is a plain :class:`ShardActor` (testable without Ray; ``ray.remote`` is
applied when the backend starts). The driver keeps no data: an actor reads its row range
from the source (arrays given in memory go into the object store once per shard). A dead
actor is replaced (``__init__`` reloads its shard; local variables come back as
:mod:`~distvi.backends.ray_locals` says) and the step sent again; minibatches depend only
on (seed, rank, step), so it answers exactly what the lost one would have.

Plain actor calls carry a step (the reference: they wait for a replacement actor and name a
hung one), or a fast path from :mod:`~distvi.backends.ray_paths` with identical numbers:
a direct TCP connection to each worker (``path="auto"``, the default, and ``"direct"``) or
a Ray Compiled Graph (``"compiled"``). The fast path opens once the workers have compiled;
at the first trouble (a worker dead, hung or failing) it is closed, the step is retried
over plain calls, and it opens again for the next step. Results are summed on the driver
in rank order, so the numbers equal the local backend's.

Start-up overlaps the driver's own work: ``start(wait=False)`` joins Ray and asks for the
actors, which load their shards and compile while the driver compiles its step; the first
call waits for them. Every failure counts against the fit's
:class:`~distvi.backends.ray_fleet.RestartBudget` (per window of steps, not per lifetime).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any

import numpy as np

from distvi.backends import ray_fleet
from distvi.backends.ray_locals import LocalKeeper, keep
from distvi.backends.base import WorkerError
from distvi.backends.ray_actor import ShardActor, WorkerSpec
from distvi.backends.ray_paths import DirectPath, GraphPath, PathFailed
from distvi.backends.ray_cluster import (Background, join_or_start, joining, local_instance,
                                         ray_tls, ray_up)
from distvi.data import ArraySource, source_bounds

PATHS = ("auto", "direct", "compiled", "plain")

__all__ = ["PATHS", "RayBackend", "ShardActor", "WorkerError", "WorkerSpec"]


class _Died(Exception):
    """Worker ``rank`` died during a call (the driver replaces it)."""

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
        (the driver replaces each dead worker, on another node when its own is gone).
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
        ``"auto"`` (a direct connection to each worker; plain calls, with a warning, when
        one cannot be opened), ``"direct"`` or ``"compiled"`` (fail when that path cannot
        be opened), or ``"plain"``.
    """

    name = "ray"

    def __init__(self, spec: WorkerSpec, source: Any, num_workers: int, address: str | None = None,
                 num_cpus: float = 1.0, max_restarts: int = 3, timeout_s: float = 300.0,
                 placement_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 actor_class: type | None = None, path: str = "auto", restart_window: int = 100,
                 label: str = "a fit") -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.budget = ray_fleet.RestartBudget(max_restarts, restart_window)
        self.path = path
        self._fast = None  # a ray_paths path once open
        self._starting = None  # a Background start under way
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
        self.locals = LocalKeeper()  # with local variables: their snapshots and the steps since

    num_workers = property(lambda self: self.k)
    cpus = property(lambda self: self.k * self.num_cpus)
    holds_workers = property(lambda self: bool(self.actors))
    busy = property(lambda self: self._busy > 0)

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
        if self.actors or self._starting is not None:  # already started (or starting)
            if wait:
                self._await()
            return self
        try:
            # a join under way (begun by the shards, maybe still importing Ray) is finished
            # by the thread that launches, so this thread does not import Ray beside it
            if not joining() and ray_up():
                self._place()
                self._launch()
            else:  # Ray starts (seconds) while the driver compiles its step: joined in _await
                self._starting = Background(self._join_and_launch)
            self._pending = True
            if wait:
                self._await()
        except BaseException:
            self.close()
            raise
        self.released = False
        ray_fleet.register(self)
        return self

    def _join_and_launch(self) -> None:
        join_or_start(self.address)
        self._place()
        self._launch()

    def _joined(self) -> None:
        """Wait for a start begun in the background; its error, if any, is raised here."""
        starting = self._starting
        if starting is not None:
            try:
                starting.result()
            finally:
                if starting.done.is_set():  # not when the wait itself was interrupted
                    self._starting = None

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
        spec = dataclasses.replace(self.spec, source=None if in_memory else self.source)
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
        ).remote(self._refs[0], rank, a, b, self._refs[rank + 1], self.locals.state_for(rank))

    def _replace(self, rank: int) -> None:
        """A new worker for shard ``rank`` in place of a dead one, loaded and compiled."""
        import ray

        self._close_fast()  # the path holds the dead actor: opened again at the next step
        self._rebuild = self.path != "plain"
        try:
            ray.kill(self.actors[rank], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[rank] = self._new_actor(rank)
        self._started([self.actors[rank]], [rank])
        self.locals.replay(self.actors[rank])  # its local variables as the dead one held them

    def _started(self, actors: list, ranks: list) -> None:
        """Wait until ``actors`` have loaded their shards and compiled; one that dies doing
        so (a shard it cannot read, say) ends the start with its error."""
        try:
            # loading a shard and compiling take longer than a step: their own timeout
            self._get([a.n_rows.remote() for a in actors], step=None, what="start", ranks=ranks,
                      timeout=max(self.timeout_s, self.startup_timeout_s))
        except _Died as died:
            raise WorkerError(f"worker {ranks[died.rank]} died while starting (loading its shard "
                              f"and compiling): {died.err}") from None

    def _await(self) -> None:
        """Wait for the actors asked for by :meth:`start`: placed, loaded, compiled."""
        if not self._pending:
            return
        try:
            self._joined()
            import ray  # after the join: its thread may still be importing Ray

            ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
            if not ready:
                raise WorkerError(ray_fleet.full_message(
                    self, ray.cluster_resources().get("CPU", 0.0), self.placement_timeout_s))
            self._started(self.actors, list(range(self.k)))
            self._pending = False
            if self.path != "plain":
                self._open_fast()
        except BaseException:
            self.close()
            raise

    def release(self) -> None:
        """Let the workers go while idle (Ray stays up); :meth:`start` brings them back."""
        keep(self)
        self._stop_workers()
        self.released = True

    def _get(self, refs, step: int | None, timeout: float | None = None, what: str = "answer",
             ranks: list | None = None):
        """Every answer, in order; a worker that died raises :class:`_Died` (the caller
        replaces it), any other failure a :class:`WorkerError`."""
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
                hung = [(ranks or range(len(refs)))[r] for r, ref in enumerate(refs) if ref not in ready]
                what = ("start (load the shard and compile)" if what == "start"
                        else what if step is None else f"{what} step {step}")
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

    # ------------------------------------------------------------------ fast paths
    def _open_fast(self) -> None:
        """Open the fast path (``ray_paths``; a worker found dead meanwhile is replaced as in
        any call); in ``"auto"``, fall back to plain calls with a warning when it cannot."""
        if self.path == "auto" and ray_tls():  # the direct path is not encrypted: Ray's is
            self.path = "plain"
            return
        try:
            if self.path == "compiled":
                self._fast = GraphPath(self.actors, self.timeout_s)
            else:
                token = DirectPath.new_token()
                addresses = self._call_all("listen", [(token,)] * self.k, self._last_step)
                self._fast = DirectPath(addresses, token, self.timeout_s)
        except Exception as err:
            self._fast = None
            if not self.actors:  # the restart budget was spent meanwhile: the fit's error
                raise
            if self.path != "auto":
                raise WorkerError(f"could not open the {self.path} path to the workers: {err}") from err
            warnings.warn(f"the direct path to the workers is unavailable, using plain actor "
                          f"calls: {err}", RuntimeWarning, stacklevel=2)
            self.path = "plain"

    def _close_fast(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self._fast = None

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Sum over shards, in rank order, of the scaled minibatch answers."""
        self._last_step = step
        if self._pending or not self.actors:
            self.start()
        if self._rebuild and self._fast is None:
            self._rebuild = False
            self._open_fast()
        answers = None
        if self._fast is not None:
            try:
                answers = self._fast.evaluate(points, step, with_logp)
            except PathFailed:
                # a worker died, hung or failed: retry this step over plain calls (they wait
                # for a restart, name a worker that hangs again, report an error) and open
                # the path again for the next step
                self._close_fast()
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
        self.locals.after_step(self, points, step, with_logp)  # with local variables: kept
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
    def fast_path(self) -> str | None:
        """The path steps currently take besides plain calls: "direct", "compiled" or None."""
        return None if self._fast is None else self._fast.name

    def _stop_workers(self) -> None:
        self._pending = False
        starting = self._starting
        if starting is not None:  # a start under way finishes first: its actors are stopped too
            starting.done.wait()  # (interrupted: kept, and the next close waits again)
        self._starting = None
        import ray

        if not ray.is_initialized():
            with contextlib.suppress(Exception):
                self._close_fast()  # its sockets, at least
            self.actors, self._refs, self._pg, self._fast = [], [], None, None
            return
        self._close_fast()
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
