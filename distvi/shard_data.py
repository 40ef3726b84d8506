"""Where a fit's rows are and how they are split: :class:`Shards`.

The shards are contiguous row ranges of the source; each has its batch (rows a step, or all
of them) and lives in a shard worker of the backend, which is started on first use and
released by :meth:`Shards.close`. An approximation reaches the full data through its fit's
shards (``approx.shard_data``): the full-data log-likelihood and the row-wise deterministics
are computed by the workers, without copying the rows to the driver.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from distvi import _validate

BACKENDS = ("local", "ray")


def check_settings(batch_size, num_workers, backend, backend_options) -> dict[str, Any]:
    """The data keywords, checked before any work, as :class:`Shards` takes them, with the
    backend's default (local for one shard, else Ray) filled in."""
    options = _validate.backend_options(backend_options)
    batch_size = _validate.positive_int("batch_size", batch_size, allow_none=True)
    num_workers = _validate.positive_int("num_workers", 1 if num_workers is None else num_workers)
    if backend is None:
        backend = "local" if num_workers == 1 else "ray"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    return {"batch_size": batch_size, "num_workers": num_workers, "backend": backend,
            "options": options}


class Shards:
    """The rows of ``source`` split into ``num_workers`` shards for the model of ``adapter``.

    A model without observed data has no shards to speak of: it is fitted on the driver, by a
    local backend with no workers (asking for workers or Ray warns). ``points_per_step()``
    and ``with_logp`` say what a started Ray backend's workers are compiled for.
    """

    def __init__(self, source: Any, adapter, *, batch_size: int | None, num_workers: int,
                 backend: str, address: str | None, options: dict, random_seed: int,
                 points_per_step: Callable[[], int], with_logp: bool) -> None:
        from distvi.data import shard_batches

        self.source, self.adapter, self.has_data = source, adapter, adapter.has_data
        if not self.has_data:  # priors and potentials only: fitted on the driver alone
            if backend == "ray" or num_workers > 1:
                import warnings

                warnings.warn("the model has no observed data: it is fitted on the driver "
                              "alone, without shard workers (num_workers and backend are "
                              "not used)", stacklevel=4)
            backend, num_workers = "local", 1
        elif num_workers > source.n_rows:
            raise ValueError(f"num_workers={num_workers} is more than the {source.n_rows} rows of data")
        if adapter.locals:  # every row of a group in one shard
            from distvi.local_data import group_source

            source = self.source = group_source(source, adapter.locals, num_workers)
        self.batch_size, self.num_workers, self.backend_name = batch_size, num_workers, backend
        self.address, self.options, self.random_seed = address, options, random_seed
        self._points_per_step, self._with_logp = points_per_step, with_logp
        # rows per step on each shard: batch_size for each, or a ready model's pm.Minibatch
        # batch_size split over the shards in proportion to their rows
        self.batches = (shard_batches(source, num_workers, batch_size, adapter.minibatch_size)
                        if self.has_data else [None])
        self.backend = None  # started by start()
        self.label = "a fit"  # whose workers, in notices and errors
        self._finalizer = None
        self.record_diagnosis: Callable[[Any], None] = lambda diagnosis: None
        # with local variables: what each shard's worker held when last asked (see sync_locals)
        self.local_states: list[dict] | None = None

    @property
    def rows_per_step(self) -> int:
        from distvi.data import rows_per_step

        return rows_per_step(self.source, self.batches) if self.has_data else 0

    def cost_divisor(self) -> float:
        """``N / B``: all the rows over the rows a step evaluates (PyMC divides its loss by it
        when ``approx.scale_cost_to_minibatch`` is set)."""
        per_step = self.rows_per_step
        return self.source.n_rows / per_step if per_step else 1.0

    # ------------------------------------------------------------ the backend
    def start(self, wait: bool = True):
        """The backend, started (its workers loaded with their shards) if it is not; with
        ``wait=False`` Ray's workers may still be loading (the first call waits)."""
        if self.backend is None:
            from distvi.backends.start import start_backend

            if self.backend_name == "ray":  # Ray starts while the workers' graph is built
                from distvi.backends.ray_cluster import begin_joining

                begin_joining(self.address)
            self.backend = start_backend(
                self.backend_name, self.adapter, self.source, self.num_workers, self.random_seed,
                self.batches, self._points_per_step(), self._with_logp, self.has_data,
                self.address, dict(self.options, label=self.label), wait=wait,
                local_states=self.local_states)
            if self.backend_name == "ray":  # shards dropped without close() still release their actors
                self._finalizer = weakref.finalize(self, self.backend.close)
        else:
            self.backend.start(wait=wait)  # workers released while idle start again
        return self.backend

    def held(self):
        """A context in which the workers are in use: another fit of this process may not
        release them."""
        held = getattr(self.start(), "held", None)
        return contextlib.nullcontext() if held is None else held()

    # ------------------------------------------------------------ local variables
    def check_local_fit(self, objective, until, average_from) -> None:
        """The fit settings not built yet for local variables, refused before any work."""
        if not self.adapter.locals:
            return
        names = [v.rv_name for v in self.adapter.locals]
        if type(objective).__name__ != "KL":
            raise ValueError(f"local variables {names} are fitted by a KL method (ADVI, "
                             "FullRankADVI, KLqp); Stein methods move particles of the global "
                             "variables only")
        refused = [what for what, bad in [
            ("n=None (fit until converged)", until is not None),
            ("average_from= (the workers' groups are not averaged)", average_from is not None),
        ] if bad]
        if refused:
            raise ValueError(f"with local variables {names}, these are not supported yet: "
                             + "; ".join(refused))

    def begin_locals(self, optimizer, state, objective) -> None:
        """Tell the workers holding local variables the optimizer of the fit about to run from
        the driver's ``state`` (where its step 0 was, whether it starts from zero) and the
        objective's weight of the KL part (KLqp's ``beta``)."""
        if self.adapter.locals:
            backend = self.start()
            backend.call("local_begin", (optimizer, state.step - state.opt_step, state.opt_step == 0,
                                         float(getattr(objective, "beta", 1.0))),
                         [()] * self.num_workers)
            keeper = getattr(backend, "locals", None)  # Ray's: a replacement replays from here
            if keeper is not None:
                keeper.snapshot(backend)

    def sync_locals(self) -> None:
        """Bring what the workers hold of the local variables to the driver (kept for
        results, and to restore workers started again)."""
        if (self.adapter.locals and self.backend is not None
                and getattr(self.backend, "holds_workers", bool(self.backend.num_workers))):
            self.local_states = self.backend.call("local_state", (), [()] * self.num_workers)

    def current_local_states(self) -> list[dict] | None:
        """What the workers hold of local variables now (None without them)."""
        self.sync_locals()
        return self.local_states

    def resume_locals(self, states: list[dict] | None) -> None:
        """The workers' local state a run store's checkpoint holds (its shards are these: the
        store's data check says so): the next workers start from it (those running now are
        let go)."""
        if self.adapter.locals:
            self.close()
            self.local_states = list(states)

    def local_draws(self, draws: int, seed: int) -> list[np.ndarray]:
        """``draws`` draws of each local variable's groups, unconstrained, ``(draws, groups,
        width)`` each: drawn by the workers from their own parameters, or (once they are let
        go) here from what they held, with the same numbers."""
        from distvi.results import draw_local, join_shards

        held = self.backend is not None and getattr(self.backend, "holds_workers", True)
        if held or self.local_states is None:
            parts = self._on_workers("local_draws", int(draws), int(seed))
        else:
            parts = [draw_local(s, int(draws), int(seed), k) for k, s in enumerate(self.local_states)]
        return join_shards(parts, axis=1)

    def write_local_draws(self, url: str, draws: int, seed: int) -> None:
        """The workers write ``draws`` draws of their groups into the run store at ``url``
        themselves (nothing of them passes through the driver)."""
        self._on_workers("write_local_draws", url, int(draws), int(seed))

    def local_params(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each local variable's ``(mu, rho)`` over all its groups, ``(groups, width)`` each
        (the initial values before any fit; empty without local variables)."""
        if not self.adapter.locals:
            return {}
        from distvi.results import join_shards

        self.sync_locals()
        names = [v.name for v in self.adapter.locals]
        if self.local_states is None:
            initial = self.adapter.data_term().initial
            return {n: (init.copy(), np.zeros_like(init)) for n, init in zip(names, initial)}
        states = self.local_states
        mus, rhos = join_shards([s["mu"] for s in states]), join_shards([s["rho"] for s in states])
        return {n: (mu, rho) for n, mu, rho in zip(names, mus, rhos)}

    def close(self) -> None:
        """Release the backend's workers (what they hold of local variables is kept here)."""
        try:
            self.sync_locals()
        except Exception as err:  # a backend that is down: the states of the last sync stay
            import warnings

            warnings.warn(f"the workers' local variables could not be read before they were "
                          f"released ({type(err).__name__}: {err}); the results keep what they "
                          "held when last read", stacklevel=2)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    # ------------------------------------------------------------ the full data
    def _on_workers(self, method: str, *shared, points: np.ndarray | None = None) -> list:
        """``worker.method(*shared[, points])`` on every shard worker (``points`` put where
        every worker reads them); workers started only for it are released after."""
        was_open = self.backend is not None
        backend = self.start()
        try:
            with self.held():
                if points is not None:
                    shared = (*shared, backend.share(np.ascontiguousarray(points, dtype="float64")))
                return backend.call(method, shared, [()] * self.num_workers)
        finally:
            if not was_open:
                self.close()

    def _on_whole_shards(self, method: str, points: np.ndarray, *before) -> list:
        """``worker.method(*before, points)`` on every shard worker, over its whole shard."""
        return self._on_workers(method, *before, points=points)

    def logp(self, points: np.ndarray) -> np.ndarray:
        """The log-likelihood of all the rows at each flat point (S, D): every shard worker
        sums its whole shard (no minibatch)."""
        if not self.has_data:
            return np.zeros(np.shape(points)[0])
        return np.sum(self._on_whole_shards("full_logp", points), axis=0)

    def logp_and_grad(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The log-likelihood of all the rows and its gradient at each flat point (S, D),
        summed over the shard workers' whole shards."""
        if not self.has_data:
            return np.zeros(np.shape(points)[0]), np.zeros(np.shape(points))
        parts = self._on_whole_shards("full_logp_grad", points)
        return (np.sum([p[0] for p in parts], axis=0), np.sum([p[1] for p in parts], axis=0))

    def deterministics(self, term, points: np.ndarray) -> list[np.ndarray]:
        """The row-wise deterministics of ``term`` at each flat point (S, D), computed by the
        shard workers on their whole shards and joined in row order: (S, N, ...) each."""
        parts = self._on_whole_shards("deterministics", points, term)
        return [np.concatenate([p[i] for p in parts], axis=1) for i in range(len(term.names))]
