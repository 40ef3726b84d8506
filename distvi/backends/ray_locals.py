"""What the driver keeps so that a Ray worker holding local variables can be rebuilt exactly
(see :mod:`distvi.local_worker`): a snapshot of each worker's local state and the steps
since.

- A snapshot is each worker's ``local_state()`` returned into Ray's object store: the driver
  owns those objects (they outlive the worker that made them) and holds their references; the
  state is not copied to the driver. One is taken when a fit begins (after its optimizer is
  named to the workers) and every ``every`` steps after, the driver waiting until each is
  stored (so that it is the state after that step, not a later one).
- Between snapshots the driver keeps each step's global points (``S x D`` numbers a step;
  they do not grow with the groups).
- A worker that dies is replaced from its snapshot and the kept steps are replayed to it in
  order (its minibatches and normals are addressed by step): it then holds what the dead one
  held, and the step that found it dead is sent again. The workers that answered it
  already give the same answer again without updating twice.
- Where the workers are let go while idle, their state is fetched into the spec the next
  workers are built from (:func:`keep`), and the snapshot starts from there.
"""

from __future__ import annotations

import dataclasses

# steps between snapshots of the workers' local state (each one an O(groups) copy per worker
# into the object store; a replacement replays at most this many steps)
SNAPSHOT_EVERY = 100


def holds_locals(backend) -> bool:
    """Whether the backend's workers hold local variables (state that lives only there)."""
    return bool(getattr(backend.spec.data_term, "locals", None))


class LocalKeeper:
    """The snapshot references and the steps since, for one backend's workers."""

    def __init__(self, every: int | None = None) -> None:
        self.every = int(SNAPSHOT_EVERY if every is None else every)
        self.refs: list | None = None  # per rank: an ObjectRef of its state (None: the spec's)
        self.steps: list[tuple] = []   # (points, step, with_logp) since the snapshot

    def snapshot(self, backend) -> None:
        """Each worker's state now, into the object store (waited for, not fetched)."""
        import ray

        refs = [a.local_state.remote() for a in backend.actors]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        self.refs, self.steps = refs, []

    def after_step(self, backend, points, step: int, with_logp: bool) -> None:
        """A step answered: kept until the next snapshot (nothing without local variables)."""
        if not holds_locals(backend):
            return
        self.steps.append((points.copy(), int(step), bool(with_logp)))
        if len(self.steps) >= self.every:
            self.snapshot(backend)

    def state_for(self, rank: int):
        """What a new worker of ``rank`` starts from: its snapshot (None: the spec's state)."""
        return None if self.refs is None else self.refs[rank]

    def replay(self, actor) -> None:
        """The kept steps, in order, to a worker rebuilt from the snapshot."""
        import ray

        for points, step, with_logp in self.steps:
            ray.get(actor.evaluate.remote(points, step, with_logp))

    def forget(self) -> None:
        self.refs, self.steps = None, []


def keep(backend) -> None:
    """Before workers holding local variables are let go: their state into the spec the next
    workers are built from."""
    if holds_locals(backend) and backend.actors:
        states = backend.call("local_state", (), [()] * backend.k)
        backend.spec = dataclasses.replace(backend.spec, local_states=tuple(states))
        backend.locals.forget()
