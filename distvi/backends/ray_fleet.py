"""The Ray workers of this process: who holds the cluster's CPUs, idle fits letting theirs
go, and how many worker failures a fit survives.

Several fits in one process (a notebook: fit ADVI, keep it, fit FullRankADVI) each hold
their shard workers between fits. A new backend that cannot be placed first releases the
workers of backends that are idle (not inside a fit or a full-data call): each says so in
one line and starts its workers again on its next use, with the same numbers (a worker's
answers depend only on the run seed, its rank and the step). When even that does not make
room, the error says who holds the CPUs and what to do.

Failures are budgeted per window of steps, not per worker's lifetime: a long run on
preemptible nodes may lose workers many times over hours; it gives up only when failures
come faster than ``max_restarts`` within ``restart_window`` steps.
"""

from __future__ import annotations

import sys
import weakref
from collections import deque

from distvi.backends.base import WorkerError

_LIVE: weakref.WeakSet = weakref.WeakSet()


def register(backend) -> None:
    _LIVE.add(backend)


def unregister(backend) -> None:
    _LIVE.discard(backend)


def _holding(but=None) -> list:
    return [b for b in list(_LIVE) if b is not but and b.holds_workers]


def release_idle(but) -> None:
    """Release the workers of this process's idle backends (all but ``but``)."""
    for backend in _holding(but):
        if not backend.busy:
            backend.release()
            print(f"distvi: released the {backend.num_workers} idle Ray workers of {backend.label} "
                  f"to make room; they start again on its next fit", file=sys.stderr, flush=True)


def busy_cpus(but=None) -> float:
    """CPUs held by this process's backends that are inside a fit now."""
    return sum(b.cpus for b in _holding(but) if b.busy)


def full_message(backend, total: float, waited_s: float | None = None) -> str:
    """Why ``backend`` cannot be placed, who holds the CPUs, and what to do."""
    mine = _holding(backend)
    held = sum(b.cpus for b in mine)
    when = f" within {waited_s:.0f} s" if waited_s is not None else ""
    who = ("; ".join(f"{b.label} holds {b.cpus:g} ({b.num_workers} workers, "
                     f"{'in a fit now' if b.busy else 'idle'})" for b in mine)
           or "no fit of this process holds any")
    others = max(total - held, 0.0)
    return (f"could not place {backend.num_workers} workers with {backend.num_cpus:g} CPU each"
            f"{when}: the cluster has {total:g} CPUs; {who}"
            + (f"; other jobs or actors hold up to {others:g}" if others else "")
            + ". Release workers you no longer need with close() (or fit inside "
              "`with inference:`), or ask for fewer workers (num_workers=...) or less CPU "
              "each (backend_options={'num_cpus': 0.5})")


class RestartBudget:
    """At most ``max_restarts`` worker failures within any ``window`` consecutive steps."""

    def __init__(self, max_restarts: int, window: int) -> None:
        if int(max_restarts) < 0:
            raise ValueError(f"max_restarts must be at least 0, got {max_restarts}")
        if int(window) < 1:
            raise ValueError(f"restart_window must be at least 1 step, got {window}")
        self.max_restarts, self.window = int(max_restarts), int(window)
        self.recent: deque = deque()  # (step, rank) of the failures in the window
        self.total = 0

    def record(self, step: int | None, rank: int, what: str) -> None:
        """Count a failure of worker ``rank`` at ``step``; a WorkerError once the failures in
        the window are more than the budget."""
        step = 0 if step is None else int(step)
        self.total += 1
        self.recent.append((step, rank))
        while self.recent and self.recent[0][0] <= step - self.window:
            self.recent.popleft()
        if len(self.recent) > self.max_restarts:
            first = self.recent[0][0]
            raise WorkerError(
                f"worker {rank} {what} at step {step}: {len(self.recent)} worker failures "
                f"within {max(step - first, 0) + 1} steps (steps {first}-{step}; {self.total} "
                f"since the workers started) exceed the restart budget of max_restarts="
                f"{self.max_restarts} per restart_window={self.window} steps, so the workers "
                f"are failing faster than they can be replaced and the fit gives up. If "
                f"failures this often are expected, raise backend_options max_restarts or "
                f"lower restart_window; else see the workers' logs for the cause")
