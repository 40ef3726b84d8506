"""The tree of partial sums (distvi.backends.ray_tree): its grouping, and on real Ray actors
its sums against the flat rank-order sum (bit for bit when the grouping is the flat one)."""

import sys

import numpy as np
import pytest

from distvi.backends.ray import ShardActor
from distvi.backends.ray_tree import TreeReducer, add_in_order, pids_of, tree_levels


def shard_answer(rank: int, step: int, n_points: int = 2, ndim: int = 6):
    """What shard ``rank`` answers at ``step``: positive values whose size differs by rank
    (1e-3 to 1e3), so that another order of additions rounds differently."""
    rng = np.random.default_rng([rank, step])
    scale = 10.0 ** (3 * np.sin(rank + 1))
    return (scale * rng.uniform(0.5, 1.5, n_points),
            scale * rng.uniform(0.5, 1.5, (n_points, ndim)), 1e-3 * (rank + 1))


class ArithmeticShard(ShardActor):
    """A shard actor without a model: it answers ``shard_answer(rank, step)``."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def evaluate(self, points, step, with_logp=True):
        return (*shard_answer(self.rank, step, *points.shape), 1000 + self.rank)  # a "pid"


def test_the_grouping_is_consecutive_ranks_level_by_level():
    assert tree_levels(5, 2) == [[[0, 1], [2, 3], [4]], [[0, 1], [2]]]
    assert tree_levels(8, 8) == [] and tree_levels(1, 8) == []
    assert tree_levels(9, 8) == [[[0, 1, 2, 3, 4, 5, 6, 7], [8]]]
    levels = tree_levels(512, 8)
    assert [len(groups) for groups in levels] == [64, 8]
    assert [r for g in levels[0] for r in g] == list(range(512))
    with pytest.raises(ValueError, match="fan_out"):
        tree_levels(4, 1)
    assert pids_of([(0, 0, 0, 7), (0, 0, 0, (8, 9)), (0, 0, 0)]) == (7, 8, 9, None)


def test_tree_sums_equal_the_flat_sum_on_ray_actors(ray_cluster):
    ray = ray_cluster
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    n, points = 5, np.zeros((2, 6))
    actors = [ray.remote(ArithmeticShard).options(num_cpus=0).remote(r) for r in range(n)]
    try:
        for step in (0, 3):
            answers = [shard_answer(r, step) for r in range(n)]
            flat = add_in_order(answers)  # RayBackend.evaluate's sum, in rank order
            # the grouping of fan_out 2: ((a0 + a1) + (a2 + a3)) + a4
            pair = lambda x, y: add_in_order([x, y])  # noqa: E731
            grouped = pair(pair(pair(answers[0], answers[1]), pair(answers[2], answers[3])), answers[4])

            with TreeReducer(actors, fan_out=8) as tree:  # N <= fan_out: no reducer
                assert tree.depth == 0 and not tree.reducers
                logp, grad, compute_s = tree.evaluate(points, step)
            np.testing.assert_array_equal(logp, flat[0])
            np.testing.assert_array_equal(grad, flat[1])
            assert compute_s == pytest.approx(5e-3)

            with TreeReducer(actors, fan_out=2) as tree:
                assert tree.depth == 2 and len(tree.reducers) == 3  # groups of one are no reducer
                logp, grad, compute_s = tree.evaluate(points, step)
            np.testing.assert_array_equal(logp, grouped[0])
            np.testing.assert_array_equal(grad, grouped[1])
            assert compute_s == pytest.approx(5e-3)
            np.testing.assert_allclose(logp, flat[0], rtol=1e-12, atol=0)
            np.testing.assert_allclose(grad, flat[1], rtol=1e-12, atol=0)
            assert tree.last_pids == tuple(range(1000, 1000 + n))  # rank order, through the levels

        with TreeReducer(actors, fan_out=2, compiled=True) as tree:
            logp, grad, _ = tree.evaluate(points, 3)
        np.testing.assert_array_equal(logp, grouped[0])
        np.testing.assert_array_equal(grad, grouped[1])
        assert tree.last_pids == tuple(range(1000, 1000 + n))
    finally:
        for a in actors:
            ray.kill(a)
