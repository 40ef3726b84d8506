"""Both backends keep the Backend contract; the local one is the reference sum over shards."""

import numpy as np
import pytest

from distvi.backends import Backend, LocalBackend
from distvi.backends.ray import RayBackend, WorkerSpec
from distvi.data import ArraySource, shard_bounds
from distvi.model import DataSchema, ModelAdapter
from distvi.worker import ShardWorker, compiled_by_points

from conftest import logistic_factory


@pytest.fixture(scope="module")
def adapter(logistic_data):
    return ModelAdapter.from_factory(logistic_factory, DataSchema.of(logistic_data))


def _workers(adapter, data, k, batch_size=50, seed=7):
    src = ArraySource(data)
    term = compiled_by_points(adapter.data_term())
    return [ShardWorker(src.read(a, b), r, seed, batch_size, term)
            for r, (a, b) in enumerate(shard_bounds(src.n_rows, k))]


def test_both_backends_are_backends(adapter, logistic_data):
    assert isinstance(LocalBackend(_workers(adapter, logistic_data, 2)), Backend)
    # constructing a RayBackend starts nothing: the contract is checked without Ray running
    spec = WorkerSpec(adapter.data_term(), ArraySource(logistic_data))
    assert isinstance(RayBackend(spec, ArraySource(logistic_data), 2), Backend)
    assert not isinstance(object(), Backend)


@pytest.mark.parametrize("with_logp", [True, False])
def test_local_evaluate_is_the_sum_of_its_workers(adapter, logistic_data, with_logp):
    points = np.random.default_rng(1).normal(size=(3, adapter.ndim))
    with LocalBackend(_workers(adapter, logistic_data, 2)) as backend:
        assert backend.num_workers == 2
        logp, grad = backend.evaluate(points, 11, with_logp)
        assert backend.last_compute_s > 0
    assert backend.num_workers == 0  # closed on leaving the block
    (lp0, g0), (lp1, g1) = (w.evaluate(points, 11, with_logp)
                            for w in _workers(adapter, logistic_data, 2))
    np.testing.assert_array_equal(logp, lp0 + lp1)
    np.testing.assert_array_equal(grad, g0 + g1)


def test_local_call_runs_in_rank_order_and_share_is_the_array(adapter, logistic_data):
    backend = LocalBackend(_workers(adapter, logistic_data, 3))
    x = np.arange(3.0)
    assert backend.share(x) is x
    assert backend.call("__getattribute__", (), [("rank",)] * 3) == [0, 1, 2]


def test_a_backend_without_shards_answers_zeros():
    backend = LocalBackend([])
    points = np.ones((2, 4))
    logp, grad = backend.evaluate(points, 0)
    np.testing.assert_array_equal(logp, np.zeros(2))
    np.testing.assert_array_equal(grad, np.zeros((2, 4)))
