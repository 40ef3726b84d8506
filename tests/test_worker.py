"""Shards: the scaled sum over shards is the full-data term; minibatches are keyed by step."""

import numpy as np
import pytest

from distvi.data import ArraySource, shard_bounds
from distvi.model import DataSchema, ModelAdapter
from distvi.worker import ShardWorker, compiled_by_points

from conftest import logistic_factory


@pytest.fixture(scope="module")
def adapter(logistic_data):
    return ModelAdapter.from_factory(logistic_factory, DataSchema.of(logistic_data))


def _workers(adapter, data, k, batch_size, seed=7):
    src = ArraySource(data)
    term = compiled_by_points(adapter.data_term())
    return [ShardWorker(src.read(a, b), r, seed, batch_size, term)
            for r, (a, b) in enumerate(shard_bounds(src.n_rows, k))]


def test_shard_bounds_are_contiguous_and_near_equal():
    bounds = shard_bounds(10, 4)
    assert bounds == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_shard_bounds_follow_chunks_when_they_can():
    assert shard_bounds(250, 2, align=100) == [(0, 200), (200, 250)]
    assert shard_bounds(1000, 3, align=100) == [(0, 400), (400, 700), (700, 1000)]
    assert shard_bounds(150, 2, align=100) == [(0, 75), (75, 150)]  # too few chunks: rows


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sum_over_shards_equals_full_data_gradient(adapter, logistic_data, k):
    points = np.random.default_rng(0).normal(size=(3, adapter.ndim))
    full_lp, full_g = adapter.compile_data_term(3)(points, *logistic_data.values(), np.array(1.0))
    answers = [w.evaluate(points, step=5) for w in _workers(adapter, logistic_data, k, None)]
    np.testing.assert_allclose(sum(a[0] for a in answers), full_lp, rtol=1e-10)
    np.testing.assert_allclose(sum(a[1] for a in answers), full_g, rtol=1e-10, atol=1e-10)


def test_minibatch_is_scaled_and_unbiased(adapter, logistic_data):
    (worker,) = _workers(adapter, logistic_data, 1, batch_size=50)
    point = np.array([[0.3, -0.2, 0.1, 0.4, -0.5]])
    full, _ = adapter.compile_data_term(1)(point, *logistic_data.values(), np.array(1.0))
    estimates = np.array([worker.evaluate(point, s)[0][0] for s in range(3000)])
    se = estimates.std() / np.sqrt(len(estimates))
    assert abs(estimates.mean() - full[0]) < 4 * se
    assert worker.scale == 600 / 50


def test_minibatch_depends_only_on_seed_rank_and_step(adapter, logistic_data):
    a = _workers(adapter, logistic_data, 2, batch_size=20)
    b = _workers(adapter, logistic_data, 2, batch_size=20)
    first = a[1].minibatch(3)[0]
    a[1].minibatch(5000)  # another offset block; asking for step 3 again repeats it exactly
    np.testing.assert_array_equal(a[1].minibatch(3)[0], first)
    np.testing.assert_array_equal(b[1].minibatch(3)[0], first)
    assert not np.array_equal(a[0].minibatch(4)[0], a[0].minibatch(5)[0])
    c = _workers(adapter, logistic_data, 2, batch_size=20, seed=8)
    assert not np.array_equal(a[1].minibatch(3)[0], c[1].minibatch(3)[0])


def test_gradient_only_evaluation_equals_the_full_one(adapter, logistic_data):
    worker = _workers(adapter, logistic_data, 2, 50)[1]
    points = np.random.default_rng(3).normal(size=(4, adapter.ndim))
    logp, grad = worker.evaluate(points, 9)
    no_logp, same_grad = worker.evaluate(points, 9, with_logp=False)
    np.testing.assert_array_equal(same_grad, grad)
    np.testing.assert_array_equal(no_logp, np.zeros(4))
    assert np.all(logp < 0)

