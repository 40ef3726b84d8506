"""Starting the backend a fit asked for: in-process shard workers or Ray actors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def start_backend(name: str, adapter, source, num_workers: int, random_seed: int,
                  shard_batches: Sequence[int | None], points_per_step: int, with_logp: bool,
                  has_data: bool = True, address: str | None = None,
                  options: dict[str, Any] | None = None, wait: bool = True,
                  local_states: Sequence[dict] | None = None):
    """A started backend whose shard ``k`` holds the ``k``-th row range of ``source`` and
    answers the model's data term on ``shard_batches[k]`` rows a step (None: all of them).

    ``"local"``: the shard workers live in this process (none when the model has no data);
    ``"ray"``: one actor per shard, on the cluster at ``address`` (with ``wait=False``
    returned once the actors are asked for: they load and compile while the caller works).
    With local variables, ``local_states[k]`` (when given) is what shard ``k`` held before.
    """
    from distvi.data import source_bounds
    from distvi.local_worker import shard_worker
    from distvi.worker import compiled_by_points

    if name == "ray":
        from distvi._compile import compiler_facts
        from distvi.backends.ray import RayBackend, WorkerSpec

        spec = WorkerSpec(adapter.data_term(), None, random_seed, tuple(shard_batches),
                          points_per_step, with_logp, compiler_facts(),
                          None if local_states is None else tuple(local_states))
        ray_options = {k: v for k, v in (options or {}).items() if k != "fused"}
        return RayBackend(spec, source, num_workers, address=address, **ray_options).start(wait)
    from distvi.backends.local import LocalBackend

    if not has_data:
        return LocalBackend([])
    data_term = compiled_by_points(adapter.data_term())
    return LocalBackend([
        shard_worker(source.read(a, b), rank, random_seed, shard_batches[rank], data_term,
                     None if local_states is None else local_states[rank])
        for rank, (a, b) in enumerate(source_bounds(source, num_workers))
    ])
