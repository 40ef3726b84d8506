"""A tree of partial sums over shard actors, so the driver does not receive and add N answers.

With N shard actors the driver of :class:`~distvi.backends.ray.RayBackend` sends N calls,
receives N answers and adds them one after the other: its cost per step grows with N
(``benchmarks/bench_driver.py`` measures it). A :class:`TreeReducer` puts reducer actors
between the driver and the shards. Each reducer calls a group of at most ``fan_out``
children (shard actors, or reducers of the level below), adds their answers in rank order
and returns one partial sum in the shape of a shard's answer, ``(logp, grad, compute_s,
pids)`` (``pids``: the process ids its shards answered from, in rank order); the driver calls at most ``fan_out`` nodes of the top level and
adds their partial sums in order. Its work per step is then bounded by ``fan_out`` whatever
N; a step's latency grows instead by one hop per level (``ceil(log_fan_out(N)) - 1`` levels
of reducers).

The grouping is fixed: level by level, consecutive nodes in rank order, ``fan_out`` to a
group (the last group may be smaller); a group of one is its node itself (no reducer). The
order of every addition is therefore fixed and the result deterministic.

Floating point
    A tree sum adds in a different order from the flat rank-order sum ``((a0 + a1) + a2)
    + ...``: ``(a0 + ... + a7) + (a8 + ... + a15)`` differs from it in the last bits (relative
    differences around N x 1e-16), unless the grouping is the same. With ``N <= fan_out``
    there is one group, no reducer is made, and the driver adds the shards' answers itself
    exactly as ``RayBackend.evaluate`` does: the numbers are bit for bit today's.

Two ways to run it, like the backend's two paths:

- plain actor calls (``compiled=False``): the driver calls the top level's nodes; a reducer
  calls its children from inside its own method and waits for them;
- a Ray Compiled Graph (``compiled=True``): the same tree as one graph, shards' answers
  going to their reducer over channels.

The tree does not own the shard actors: :meth:`TreeReducer.close` kills only the reducers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

__all__ = ["ReducerActor", "TreeReducer", "add_in_order", "pids_of", "tree_levels"]


def tree_levels(n: int, fan_out: int) -> list[list[list[int]]]:
    """The grouping: for each level of reducers, bottom first, the groups of the level
    below's node indices (``[[0..f-1], [f..2f-1], ...]``). Empty when ``n <= fan_out``.

    >>> tree_levels(5, 2)
    [[[0, 1], [2, 3], [4]], [[0, 1], [2]]]
    >>> tree_levels(8, 8)
    []
    """
    if fan_out < 2:
        raise ValueError(f"fan_out must be at least 2, got {fan_out}")
    if n < 1:
        raise ValueError(f"a tree needs at least one node, got {n}")
    levels = []
    while n > fan_out:
        groups = [list(range(i, min(i + fan_out, n))) for i in range(0, n, fan_out)]
        levels.append(groups)
        n = len(groups)
    return levels


def add_in_order(answers) -> tuple[np.ndarray, np.ndarray, float]:
    """``(logp, grad, compute_s, ...)`` answers added in the order given: a copy of the first
    (answers from Ray are read-only, or views into a compiled graph's channel), then each
    of the others added in turn; ``compute_s`` is the slowest's. Exactly the arithmetic of
    ``RayBackend.evaluate``'s flat sum."""
    logp = np.array(answers[0][0])
    grad = np.array(answers[0][1])
    for a in answers[1:]:
        logp += a[0]
        grad += a[1]
    return logp, grad, max(a[2] for a in answers)


def pids_of(answers) -> tuple:
    """The shards' process ids behind answers, in rank order: a shard's answer carries its
    own as a fourth value (None if it has none), a reducer's the tuple of its shards'."""
    out: list = []
    for a in answers:
        pid = a[3] if len(a) > 3 else None
        out.extend(pid if isinstance(pid, tuple) else (pid,))
    return tuple(out)


class ReducerActor:
    """One node of the tree inside an actor process (plain class; ``ray.remote`` is applied
    by :class:`TreeReducer`)."""

    def __init__(self, children: list | None = None) -> None:
        self.children = list(children or [])

    def evaluate(self, points: np.ndarray, step: int, with_logp: bool = True):
        """Plain calls: the children's answers, asked for together, added in rank order."""
        import ray

        return self.add(*ray.get([c.evaluate.remote(points, step, with_logp) for c in self.children]))

    def add(self, *answers):
        """The children's answers (in a compiled graph: its arguments), in rank order, as
        one: ``(logp, grad, compute_s, pids)``."""
        return (*add_in_order(answers), pids_of(answers))

    def ready(self) -> int:
        return len(self.children)


class TreeReducer:
    """Partial sums of the shard actors' answers by a tree of reducer actors.

    Parameters
    ----------
    actors
        The shard actors in rank order, each with ``evaluate(points, step, with_logp) ->
        (logp, grad, compute_s)`` (a :class:`~distvi.backends.ray.ShardActor` under Ray).
    fan_out
        Children per reducer (at least 2). With ``len(actors) <= fan_out`` no reducer is
        made and the sum is the flat rank-order sum.
    compiled
        Run the tree as a Ray Compiled Graph instead of plain actor calls.
    reducer_options
        Options for each reducer's ``.options(...)``: a dict, or a function of the reducer's
        shard ranks (the ranks its subtree covers) returning one (say, a placement group
        bundle on the node of its shards). Default: ``num_cpus=0`` (a reducer mostly waits).
    timeout_s
        Seconds :meth:`evaluate` waits for the top level's answers.

    Use ``submit`` and ``combine`` to keep a caller's own waiting and error handling
    (``combine(ray.get(submit(...)))`` is :meth:`evaluate` on plain calls).
    """

    def __init__(self, actors: list, fan_out: int = 8, compiled: bool = False,
                 reducer_options: dict | Callable[[list[int]], dict] | None = None,
                 timeout_s: float = 300.0) -> None:
        import ray

        self.actors = list(actors)
        self.fan_out = int(fan_out)
        self.levels = tree_levels(len(self.actors), self.fan_out)
        self.compiled = bool(compiled)
        self.timeout_s = float(timeout_s)
        self.reducers: list = []
        self._cdag = None
        self.last_compute_s = 0.0
        self.last_pids: tuple = ()
        remote = ray.remote(ReducerActor)
        nodes = list(self.actors)
        spans = [[r] for r in range(len(self.actors))]  # the shard ranks under each node
        try:
            for groups in self.levels:
                next_nodes, next_spans = [], []
                for group in groups:
                    span = [r for i in group for r in spans[i]]
                    if len(group) == 1:  # a sum of one is its node: no reducer
                        next_nodes.append(nodes[group[0]])
                    else:
                        node = remote.options(**self._options(reducer_options, span)).remote(
                            None if self.compiled else [nodes[i] for i in group])
                        self.reducers.append(node)
                        next_nodes.append(node)
                    next_spans.append(span)
                nodes, spans = next_nodes, next_spans
            self.top = nodes
            ray.get([r.ready.remote() for r in self.reducers], timeout=self.timeout_s)
            if self.compiled:
                self._build_graph()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _options(reducer_options, span: list[int]) -> dict:
        if reducer_options is None:
            return {"num_cpus": 0}
        return dict(reducer_options(span) if callable(reducer_options) else reducer_options)

    @property
    def depth(self) -> int:
        """Levels of reducers between the driver and the shards (0: the flat sum)."""
        return len(self.levels)

    # ------------------------------------------------------------------ compiled graph
    def _build_graph(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as inp:
            nodes = [a.evaluate.bind(inp[0], inp[1], inp[2]) for a in self.actors]
            made = iter(self.reducers)  # in the order __init__ made them: level by level
            for groups in self.levels:
                nodes = [nodes[g[0]] if len(g) == 1 else next(made).add.bind(*(nodes[i] for i in g))
                         for g in groups]
            dag = MultiOutputNode(nodes)
        self._cdag = dag.experimental_compile()

    # ------------------------------------------------------------------ a step
    def submit(self, points: np.ndarray, step: int, with_logp: bool = True) -> list:
        """The top level's calls for one step (plain: object refs; compiled: the graph's
        output refs), in rank order."""
        if self._cdag is not None:
            return list(self._cdag.execute(points, step, with_logp))
        return [n.evaluate.remote(points, step, with_logp) for n in self.top]

    def combine(self, answers) -> tuple[np.ndarray, np.ndarray, float]:
        """The top level's answers added in order: ``(logp, grad, compute_s)``, where
        ``compute_s`` is the slowest shard's own compute; the shards' process ids, in rank
        order, are kept as ``last_pids`` (a changed one: that shard was restarted)."""
        answers = list(answers)
        self.last_pids = pids_of(answers)
        logp, grad, compute_s = add_in_order(answers)
        self.last_compute_s = compute_s
        return logp, grad, compute_s

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
        """One step through the tree: ``(logp, grad, compute_s)``, the sum over all shards."""
        import ray

        refs = self.submit(points, step, with_logp)
        if self._cdag is not None:
            deadline = time.monotonic() + self.timeout_s
            return self.combine([ray.get(r, timeout=max(deadline - time.monotonic(), 0.0))
                                 for r in refs])
        return self.combine(ray.get(refs, timeout=self.timeout_s))

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Tear the graph down and kill the reducers (the shard actors are the caller's)."""
        import ray

        if self._cdag is not None:
            try:
                self._cdag.teardown()
            except Exception:  # a graph whose actor is already gone went with it
                pass
        self._cdag = None
        for r in self.reducers:
            try:
                ray.kill(r)
            except Exception:
                pass
        self.reducers = []

    def __enter__(self) -> TreeReducer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

