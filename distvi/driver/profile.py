"""Profiling as a wrapper of the step, the backend and the hooks: seconds by phase."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from distvi.driver.hooks import NO_LIMIT, Hook


@dataclass
class Profile:
    """Seconds spent per phase over a profiled run (see ``Inference.run_profiling``).

    ``phases`` holds ``draw``, ``workers``, ``transfer``, ``kernel`` (Stein methods only),
    ``update`` and ``logging``; ``wall`` is the whole loop, so ``wall - sum(phases)`` (shown as
    ``other``) is the loop's own Python bookkeeping.
    """

    n: int
    phases: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def per_step_us(self) -> dict[str, float]:
        return {k: 1e6 * v / max(self.n, 1) for k, v in self.rows().items()}

    def rows(self) -> dict[str, float]:
        """The phases, then ``other`` (wall time not in any phase) when the wall was timed."""
        rows = dict(self.phases)
        if self.wall:
            rows["other"] = max(self.wall - sum(self.phases.values()), 0.0)
        return rows

    def summary(self, file=None) -> None:
        """Print the table, as PyTensor's profile ``summary()`` that ``pymc``'s
        ``run_profiling`` returns does."""
        print(self, file=file or sys.stdout)

    def __str__(self) -> str:
        rows = self.rows()
        total = self.wall or sum(rows.values()) or 1.0
        lines = [f"{'phase':<10} {'total s':>9} {'us/step':>9} {'share':>6}"]
        for k, v in rows.items():
            lines.append(f"{k:<10} {v:9.3f} {1e6 * v / max(self.n, 1):9.1f} {v / total:6.1%}")
        if self.wall:
            lines.append(f"{'step':<10} {self.wall:9.3f} {1e6 * self.wall / max(self.n, 1):9.1f} "
                         f"{self.n / self.wall:6.0f} it/s")
        return "\n".join(lines)


class Profiler:
    """Times the phases of a loop by wrapping what it calls: the step's normals and draw
    (``draw``), the backend (``workers``: its own compute time; ``transfer``: the rest of the
    round trip), the explicit direction (``kernel``), the update (``update``, less the normals
    drawn inside it) and the hooks (``logging``)."""

    def __init__(self, n: int) -> None:
        self.profile = Profile(n, {"draw": 0.0, "workers": 0.0, "transfer": 0.0,
                                   "update": 0.0, "logging": 0.0})
        self._inner = 0.0  # seconds of a phase timed inside another one

    def _add(self, phase: str, seconds: float) -> None:
        phases = self.profile.phases
        phases[phase] = phases.get(phase, 0.0) + seconds

    def wrap_step(self, step):
        clock, normals_at, draw, update, direction = (time.perf_counter, step.normals.at,
                                                      step.draw, step.update, step.direction)

        def timed_normals(position):
            t0 = clock()
            out = normals_at(position)
            dt = clock() - t0
            self._add("draw", dt)
            self._inner += dt
            return out

        def timed_draw(state):
            t0 = clock()
            self._inner = 0.0
            out = draw(state)
            self._add("draw", clock() - t0 - self._inner)
            return out

        def timed_direction(points, answers, backend):
            t0 = clock()
            out = direction(points, answers, backend)
            if out is not None:
                self._add("kernel", clock() - t0)
            return out

        def timed_update(*args):
            t0 = clock()
            self._inner = 0.0
            out = update(*args)
            self._add("update", clock() - t0 - self._inner)
            return out

        step.normals.at, step.draw, step.update, step.direction = (
            timed_normals, timed_draw, timed_update, timed_direction)
        return step

    def wrap_backend(self, backend):
        profiler = self

        class Timed:
            def __init__(self) -> None:
                self.num_workers = backend.num_workers

            def __getattr__(self, name):
                return getattr(backend, name)

            def evaluate(self, points, step, with_logp=True):
                t0 = time.perf_counter()
                out = backend.evaluate(points, step, with_logp)
                wall = time.perf_counter() - t0
                compute = backend.last_compute_s
                profiler._add("workers", compute)
                profiler._add("transfer", wall - compute)
                return out

        return Timed()

    def wrap_fused(self, fused):
        """A fused loop's phases instead: ``compile`` (its block program, when this run
        compiled it), ``draw`` (the block's normals, offsets and rates), ``block`` (the
        compiled block) and ``logging`` (the hooks)."""
        if fused is None:
            return None
        self.profile.phases = {"compile": fused.compile_s, "draw": 0.0, "block": 0.0, "logging": 0.0}
        run, seconds = fused.run, fused.seconds

        def timed_run(state, k):
            before = dict(seconds)
            try:
                return run(state, k)
            finally:
                for phase in ("draw", "block"):
                    self._add(phase, seconds[phase] - before[phase])

        fused.run = timed_run
        return fused

    def wrap_hooks(self, hooks: list[Hook]) -> list[Hook]:
        return [_TimedHooks(self, hooks)]


class _TimedHooks:
    """The hooks as one, timed as ``logging``; it sees blocks when they all do."""

    def __init__(self, profiler: Profiler, hooks: list[Hook]) -> None:
        self.profiler, self.hooks = profiler, list(hooks)
        if all(hasattr(h, "horizon") and hasattr(h, "block") for h in self.hooks):
            self.horizon, self.block = self._horizon, self._block

    def _timed(self, call) -> None:
        t0 = time.perf_counter()
        try:
            call()
        finally:
            self.profiler._add("logging", time.perf_counter() - t0)

    def __call__(self, state, info) -> None:
        self._timed(lambda: [hook(state, info) for hook in self.hooks])

    def _horizon(self, state) -> int:
        return min([NO_LIMIT, *(h.horizon(state) for h in self.hooks)])

    def _block(self, state, info) -> None:
        self._timed(lambda: [hook.block(state, info) for hook in self.hooks])
