"""A shard worker that holds local variables: its groups' variational parameters and their
optimizer state live here, next to the groups' rows (see :mod:`distvi.local_terms`).

A step's answer is what the globals need (the groups' share of the ELBO and its gradient at
each global point); the same call updates the local parameters of the groups the step's
minibatch touches, with the fit's optimizer and learning rate, and no others:

- a step's work and traffic do not grow with the number of groups (a gather of the rows'
  slots, a scatter of their gradients summed by group);
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
from distvi.worker import ShardWorker

LOCAL_STREAM = 2**32  # + rank: each worker's normals for its local variables


class LocalShardWorker(ShardWorker):
    """A :class:`~distvi.worker.ShardWorker` whose shard holds whole groups and their local
    variables. ``state`` (from :meth:`local_state`) restores what an earlier worker held."""

    def __init__(self, rows, rank: int, seed: int, batch_size, data_term, state: dict | None = None) -> None:
        super().__init__(rows, rank, seed, batch_size, data_term)
        term = data_term.data_term
        self.term = term
        names = list(rows)
        col = names.index(term.locals[0].column)
        groups = np.asarray(self.rows[col], dtype=np.int64)
        own = groups if self.full else groups[: self.n_rows]
        self.group_lo = int(own.min())
        n = int(own.max()) + 1 - self.group_lo
        counts = np.bincount(own - self.group_lo, minlength=n)
        self._idx = (groups - self.group_lo).astype(np.intp)  # a row's group, per row of self.rows
        self._weight = 1.0 / counts[self._idx]
        self.n_groups = n
        self._eps_stream = Stream(seed, LOCAL_STREAM + rank)
        lo, hi = self.group_lo, self.group_lo + n
        self.mu = [np.array(init[lo:hi]) for init in term.initial]
        self.rho = [np.zeros_like(m) for m in self.mu]
        self._optimizer, self._slots, self._counters, self._rule = None, [], [], None
        self._offset = 0  # the run's step at which the optimizer's step 0 was
        self._last: tuple[int, tuple] | None = None
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------ the fit's optimizer
    def local_begin(self, optimizer, offset: int, fresh: bool) -> None:
        """The optimizer and schedule of the fit about to run (its step 0 was the run's step
        ``offset``); ``fresh``: the driver's optimizer state starts from zero, and so does
        the groups'."""
        if optimizer.name == "adagrad_window":
            raise ValueError("adagrad_window keeps one window position for all parameters, "
                             "which groups updated on different steps cannot share; use "
                             "another optimizer with local variables (e.g. adam)")
        if fresh or self._optimizer is None or self._optimizer.name != optimizer.name:
            state = optimizer.init_state([m.shape for m in (*self.mu, *self.rho)])
            self._slots = [np.array(a) for slots in state.slots for a in slots]
            # a counter per group (Adam's step t): a group's own count of its updates
            self._counters = [np.zeros((self.n_groups, 1)) for _ in state.counters]
        self._optimizer, self._offset = optimizer, int(offset)

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
        """This step's answer for the globals; the touched groups' parameters updated."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self._optimizer is None:
            raise RuntimeError("a worker with local variables evaluates steps of a fit only "
                               "(local_begin() names the fit's optimizer first)")
        rows, idx, weight = self._window(step)
        n_points, batch = points.shape[0], idx.shape[0]
        widths = [m.shape[1] for m in self.mu]
        eps = self._eps_stream.normal((n_points, batch, sum(widths)),
                                      int(step) * n_points * batch * sum(widths))
        splits = np.cumsum(widths)[:-1]
        eps = [np.ascontiguousarray(e) for e in np.split(eps, splits, axis=2)]
        mu = [m[idx] for m in self.mu]
        rho = [r[idx] for r in self.rho]
        fn = self._data_term(n_points, True)
        value, grad, *local = fn(points, *eps, *mu, *rho, weight, *rows, self.scale)
        self._apply(idx, local, step)
        answer = (np.asarray(value), np.asarray(grad))
        self._last = (step, answer)
        return answer

    def _window(self, step: int):
        if self.full:
            return self.rows, self._idx, self._weight
        start = self._start(step)
        stop = start + self.batch_size
        return [a[start:stop] for a in self.rows], self._idx[start:stop], self._weight[start:stop]

    def _apply(self, idx: np.ndarray, local: list, step: int) -> None:
        """The optimizer's update of the groups in ``idx`` from the rows' ELBO gradients."""
        if self.full:  # every group, every step
            touched, inverse = np.arange(self.n_groups), idx
        else:  # by hashing, in the order of first appearance: O(rows), not O(groups)
            import pandas as pd

            inverse, touched = pd.factorize(idx)
        grads = []
        for g in local:  # the loss's gradient (minus the ELBO's), summed over each group's rows
            g = np.asarray(g)
            summed = np.empty((touched.size, g.shape[1]))
            for c in range(g.shape[1]):
                summed[:, c] = -np.bincount(inverse, weights=g[:, c], minlength=touched.size)
            grads.append(summed)
        params = [*self.mu, *self.rho]
        lr = self._optimizer.learning_rate_at(max(int(step) - self._offset, 0))
        out = self._update_fn()(*[p[touched] for p in params], *grads,
                                *[s[touched] for s in self._slots],
                                *[c[touched] for c in self._counters], np.array(lr))
        n = len(params)
        new_params, new_state = out[:n], out[n:]
        if not all(np.all(np.isfinite(p)) for p in new_params):
            return  # the driver's finiteness check names the step; the groups keep their values
        for p, new in zip(params, new_params):
            p[touched] = new
        for s, new in zip([*self._slots, *self._counters], new_state):
            s[touched] = new

    def full_logp(self, *args):
        raise ValueError("the full-data log-likelihood at global points alone is not defined "
                         "with local variables (it needs their draws too)")

    full_logp_grad = full_logp

    # ------------------------------------------------------------ state and results
    def local_state(self) -> dict:
        """Everything this worker holds of its groups (copies), to restore or to report."""
        return {"group_lo": self.group_lo, "mu": [m.copy() for m in self.mu],
                "rho": [r.copy() for r in self.rho], "slots": [s.copy() for s in self._slots],
                "counters": [c.copy() for c in self._counters],
                "optimizer": self._optimizer, "offset": self._offset,
                "last": None if self._last is None else self._last[0]}

    def _restore(self, state: dict) -> None:
        if state["group_lo"] != self.group_lo or state["mu"][0].shape[0] != self.n_groups:
            raise ValueError(f"the local state of groups {state['group_lo']}.. does not belong to "
                             f"shard {self.rank} (groups {self.group_lo}..)")
        self.mu = [m.copy() for m in state["mu"]]
        self.rho = [r.copy() for r in state["rho"]]
        self._slots = [s.copy() for s in state["slots"]]
        self._counters = [c.copy() for c in state["counters"]]
        self._optimizer, self._offset = state["optimizer"], state["offset"]


def shard_worker(rows, rank: int, seed: int, batch_size, data_term, state: dict | None = None):
    """The worker for a compiled data term: with local variables a :class:`LocalShardWorker`
    (restored from ``state`` when given), else a plain :class:`~distvi.worker.ShardWorker`."""
    if getattr(data_term.data_term, "locals", None):
        return LocalShardWorker(rows, rank, seed, batch_size, data_term, state)
    return ShardWorker(rows, rank, seed, batch_size, data_term)
