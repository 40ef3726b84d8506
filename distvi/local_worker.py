"""A shard worker that holds local variables: its groups' variational parameters and their
optimizer state live here, next to the groups' rows (see :mod:`distvi.local_terms`).

A step's answer is what the globals need (the groups' share of the ELBO and its gradient at
each global point); the same call updates the local parameters of the groups in the step's
minibatch, with the fit's optimizer and learning rate, and no others.

Minibatches of whole groups (as stochastic variational inference takes them): at load the
shard's groups are shuffled once (from the worker's own key) and its rows and parameters laid
out in that order, group after group; a step's minibatch is the ``B_g`` consecutive groups
from a uniform random offset (wrapping around), every row of each. Each group is in a step's
minibatch with probability ``B_g / G_k``, so the term scaled by ``G_k / B_g`` is unbiased for
every part of it (rows, priors, entropies). ``B_g`` is ``batch_size`` rows' worth of groups
(``batch_size * G_k / N_k``, at least one). Then:

- a step's work and traffic do not grow with the number of groups: its rows and its groups'
  parameters are one (or, wrapping, two) contiguous slices; a group's gradient is the sum of
  its rows', each group's rows being consecutive;
- optimizer state is per group: a group's accumulators (Adam's moments) and counters (Adam's
  bias-correction step) advance only on the steps that touch it, as if the group's own
  optimizer ran on those steps. With every row in every step (``batch_size=None``) that is
  the dense update.

The normals ``eps`` come from the worker's own stream, addressed by (seed, rank, step), and a
step already applied is answered again from its result (a retried call does not update twice).
"""

from __future__ import annotations

import numpy as np

from distvi._rng import Stream
from distvi.results import draw_local
from distvi.worker import ShardWorker

LOCAL_STREAM = 2**32  # + rank: each worker's normals for its local variables
DRAW_BLOCK_MB = 64.0  # a worker writing draws of its groups holds at most this many at once


class LocalShardWorker(ShardWorker):
    """A :class:`~distvi.worker.ShardWorker` whose shard holds whole groups and their local
    variables. ``state`` (from :meth:`local_state`) restores what an earlier worker held."""

    def __init__(self, rows, rank: int, seed: int, batch_size, data_term, state: dict | None = None) -> None:
        super().__init__(rows, rank, seed, None, data_term)  # the rows as given: sorted by group
        term = data_term.data_term
        groups = np.asarray(self.rows[list(rows).index(term.locals[0].column)], dtype=np.int64)
        self.group_lo = int(groups.min())
        n = int(groups.max()) + 1 - self.group_lo
        counts = np.bincount(groups - self.group_lo, minlength=n)
        # the groups shuffled once; rows and parameters laid out in that order
        self._order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            seed, spawn_key=(LOCAL_STREAM + rank, 0)))).permutation(n)
        starts = np.concatenate([[0], np.cumsum(counts)])
        sizes = counts[self._order]
        rows_order = np.repeat(starts[self._order] - np.concatenate([[0], np.cumsum(sizes)[:-1]]),
                               sizes) + np.arange(self.n_rows)
        self.rows = [np.ascontiguousarray(a[rows_order]) for a in self.rows]
        self._first = np.concatenate([[0], np.cumsum(sizes)])  # group k's rows: first[k]..first[k+1]
        self._weight = np.repeat(1.0 / sizes, sizes)
        self.n_groups = n
        self.groups_per_step = n if batch_size is None else int(
            min(n, max(1, round(batch_size * n / self.n_rows))))
        self.full = self.groups_per_step == n
        self.batch_size = None if self.full else int(batch_size)
        self.scale = np.array(n / self.groups_per_step, dtype="float64")
        self._eps_stream = Stream(seed, LOCAL_STREAM + rank)
        lo, hi = self.group_lo, self.group_lo + n
        self.mu = [np.array(init[lo:hi][self._order]) for init in term.initial]
        self.rho = [np.zeros_like(m) for m in self.mu]
        self._optimizer, self._slots, self._counters, self._rule = None, [], [], None
        self._optimizer_name = None  # whose state the slots are (a restored state's too)
        self._beta = np.array(1.0)
        self._offset = 0  # the run's step at which the optimizer's step 0 was
        self._last: tuple[int, tuple] | None = None
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------ the fit's optimizer
    def local_begin(self, optimizer, offset: int, fresh: bool, beta: float = 1.0) -> None:
        """The optimizer and schedule of the fit about to run (its step 0 was the run's step
        ``offset``); ``fresh``: the driver's optimizer state starts from zero, and so does
        the groups'; ``beta``: the fit's weight of the KL part."""
        if optimizer.name == "adagrad_window":
            raise ValueError("adagrad_window keeps one window position for all parameters, "
                             "which groups updated on different steps cannot share; use "
                             "another optimizer with local variables (e.g. adam)")
        if fresh or self._optimizer_name != optimizer.name:
            state = optimizer.init_state([m.shape for m in (*self.mu, *self.rho)])
            self._slots = [np.array(a) for slots in state.slots for a in slots]
            # a counter per group (Adam's step t): a group's own count of its updates
            self._counters = [np.zeros((self.n_groups, 1)) for _ in state.counters]
        self._optimizer, self._offset, self._optimizer_name = optimizer, int(offset), optimizer.name
        self._last = None  # a step's kept answer is for retries within one fit
        self._beta = np.array(float(beta))

    def _update_fn(self):
        """The optimizer's rule on the touched groups, compiled once per optimizer (its
        hyperparameters are in the graph; the learning rate is an input)."""
        opt = self._optimizer
        key = (opt.name, tuple((k, repr(v)) for k, v in opt.hyper.items() if k != "learning_rate"))
        if self._rule is None or self._rule[0] != key:
            import pytensor.tensor as pt

            from distvi._compile import function

            n = len(self.mu) * 2
            params = [pt.matrix(f"p{j}", dtype="float64") for j in range(n)]
            grads = [pt.matrix(f"g{j}", dtype="float64") for j in range(n)]
            slots = [pt.tensor(dtype="float64", shape=(None,) * s.ndim) for s in self._slots]
            counters = [pt.matrix(f"c{j}", dtype="float64") for j in range(len(self._counters))]
            lr = pt.scalar("lr", dtype="float64")
            new_p, new_s = self._optimizer.update(params, grads, [*slots, *counters], lr)
            self._rule = key, function([*params, *grads, *slots, *counters, lr], [*new_p, *new_s],
                                       trust_input=True, on_unused_input="ignore")
        return self._rule[1]

    # ------------------------------------------------------------ a step
    def warm(self, n_points: int, with_logp: bool = True) -> None:
        """Compile the step's term for ``n_points`` points (nothing is updated)."""
        self._data_term(n_points, with_logp)

    def evaluate(self, points: np.ndarray, step: int, with_logp: bool = True):
        """This step's answer for the globals; its groups' parameters updated."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self._optimizer is None:
            raise RuntimeError("a worker with local variables evaluates steps of a fit only "
                               "(local_begin() names the fit's optimizer first)")
        segments = self._segments(step)
        row_segments = [(self._first[a], self._first[b]) for a, b in segments]
        rows = [_take(a, row_segments) for a in self.rows]
        n_points, batch = points.shape[0], rows[0].shape[0]
        widths = [m.shape[1] for m in self.mu]
        eps = self._eps_stream.normal((n_points, batch, sum(widths)),
                                      int(step) * n_points * self.n_rows * sum(widths))
        eps = [np.ascontiguousarray(e) for e in np.split(eps, np.cumsum(widths)[:-1], axis=2)]
        sizes = np.concatenate([np.diff(self._first[a:b + 1]) for a, b in segments])
        per_row = [np.repeat(_take(p, segments), sizes, axis=0) for p in (*self.mu, *self.rho)]
        fn = self._data_term(n_points, True)
        value, grad, *local = fn(points, *eps, *per_row, _take(self._weight, row_segments),
                                 self._beta, *rows, self.scale)
        self._apply(segments, sizes, local, step)
        answer = (np.asarray(value), np.asarray(grad))
        self._last = (step, answer)
        return answer

    def _segments(self, step: int) -> list[tuple[int, int]]:
        """The step's groups (in the shuffled order): one range, or two where it wraps."""
        n, k = self.n_groups, self.groups_per_step
        if self.full:
            return [(0, n)]
        start = int(self._stream.integers(n, 1, step)[0])
        if start + k <= n:
            return [(start, start + k)]
        return [(start, n), (0, start + k - n)]

    def _apply(self, segments, sizes: np.ndarray, local: list, step: int) -> None:
        """The optimizer's update of the step's groups (``sizes``: their rows) from their rows'
        ELBO gradients."""
        # each group's rows are consecutive: its gradient is one reduceat segment
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        grads = [-np.add.reduceat(np.asarray(g), starts, axis=0) for g in local]  # the loss's
        params = [*self.mu, *self.rho]
        state = [*self._slots, *self._counters]
        lr = self._optimizer.learning_rate_at(max(int(step) - self._offset, 0))
        out = self._update_fn()(*[_take(p, segments) for p in params], *grads,
                                *[_take(x, segments) for x in state], np.array(lr))
        bad = sum(int(np.sum(~np.isfinite(p))) for p in out[:len(params)])
        if bad:  # the groups keep their values; the fit stops here, saying so
            raise FloatingPointError(
                f"step {step}: the update of the local variables of shard {self.rank} is not "
                f"finite ({bad} values); lower the learning rate or check the model's local terms")
        for target, new in zip([*params, *state], out):
            at = 0
            for a, b in segments:
                target[a:b] = new[at:at + b - a]
                at += b - a

    def full_logp(self, *args):
        raise ValueError("the full-data log-likelihood at global points alone is not defined "
                         "with local variables (it needs their draws too)")

    full_logp_grad = full_logp

    # ------------------------------------------------------------ state and results
    def local_state(self) -> dict:
        """Everything this worker holds of its groups, in the groups' own order (copies), to
        restore or to report."""
        def natural(arrays):
            out = []
            for a in arrays:
                back = np.empty_like(a)
                back[self._order] = a
                out.append(back)
            return out

        return {"group_lo": self.group_lo, "mu": natural(self.mu), "rho": natural(self.rho),
                "slots": natural(self._slots), "counters": natural(self._counters),
                "optimizer": self._optimizer, "optimizer_name": self._optimizer_name,
                "offset": self._offset}

    def local_draws(self, draws: int, seed: int) -> list[np.ndarray]:
        """``draws`` draws of this shard's groups (see :func:`draw_local`)."""
        return draw_local(self.local_state(), draws, seed, self.rank)

    def write_local_draws(self, url: str, draws: int, seed: int) -> None:
        """``draws`` draws of this shard's groups (see :func:`~distvi.results.draw_local`)
        written into the run store at ``url`` as ``local_draws/<name>/r<rank>``, a block of
        draws at a time (at most :data:`DRAW_BLOCK_MB` in memory)."""
        import zarr

        group = zarr.open_group(url, mode="r+")
        state = self.local_state()
        per_draw = sum(m.size for m in state["mu"]) * 8 / 2**20
        block = max(1, int(DRAW_BLOCK_MB / max(per_draw, 1e-9)))
        names = [v.rv_name if v.transform is None else v.name for v in self._data_term.data_term.locals]
        arrays = [group.create_array(f"local_draws/{n}/r{self.rank}", shape=(draws, *m.shape),
                                     dtype="float64", chunks=(min(block, draws), *m.shape),
                                     overwrite=True) for n, m in zip(names, state["mu"])]
        for a in arrays:
            a.attrs.update({"group_lo": self.group_lo})
        for first in range(0, draws, block):
            stop = min(draws, first + block)
            for a, values in zip(arrays, draw_local(state, draws, seed, self.rank, first, stop)):
                a[first:stop] = values

    def _restore(self, state: dict) -> None:
        if state["group_lo"] != self.group_lo or state["mu"][0].shape[0] != self.n_groups:
            raise ValueError(f"the local state of groups {state['group_lo']}.. does not belong to "
                             f"shard {self.rank} (groups {self.group_lo}..)")
        self.mu, self.rho = [m[self._order] for m in state["mu"]], [r[self._order] for r in state["rho"]]
        self._slots = [s[self._order] for s in state["slots"]]
        self._counters = [c[self._order] for c in state["counters"]]
        self._optimizer, self._offset = state["optimizer"], state["offset"]
        self._optimizer_name = state["optimizer_name"]


def _take(array: np.ndarray, segments) -> np.ndarray:
    """The ranges ``segments`` of ``array``'s first axis, in order (a view for one range)."""
    if len(segments) == 1:
        a, b = segments[0]
        return array[a:b]
    return np.concatenate([array[a:b] for a, b in segments])


def shard_worker(rows, rank: int, seed: int, batch_size, data_term, state: dict | None = None):
    """The worker for a compiled data term: with local variables a :class:`LocalShardWorker`
    (restored from ``state`` when given), else a plain :class:`~distvi.worker.ShardWorker`."""
    if getattr(data_term.data_term, "locals", None):
        return LocalShardWorker(rows, rank, seed, batch_size, data_term, state)
    return ShardWorker(rows, rank, seed, batch_size, data_term)
