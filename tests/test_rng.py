"""distvi._rng: random numbers addressed by (seed, stream, position).

The reference answers come from NumPy itself, not from _rng: a stream is the PCG64 generator
of ``SeedSequence(seed, spawn_key=(stream_id,))`` (which is what ``SeedSequence(seed).spawn``
hands its i-th child), each double takes one 64-bit output, so position ``p`` of a stream is
element ``p`` of that generator's ``random()`` sequence drawn from the start.
"""

import numpy as np
import pytest
from scipy import stats

from distvi._rng import DRIVER_STREAM, INIT_STREAM, Stream, check_seed


def reference_uniforms(seed: int, stream_id: int, n: int) -> np.ndarray:
    """The first ``n`` doubles of the stream, drawn in one go from a NumPy generator."""
    child = np.random.SeedSequence(seed).spawn(stream_id + 1)[stream_id]
    return np.random.Generator(np.random.PCG64(child)).random(n)


@pytest.mark.parametrize("seed, stream_id", [(0, DRIVER_STREAM), (7, 1), (2**62, 3)])
def test_positions_are_elements_of_numpys_sequence_for_the_spawned_child(seed, stream_id):
    want = reference_uniforms(seed, stream_id, 5000)
    s = Stream(seed, stream_id)
    np.testing.assert_array_equal(s.uniform(10, 0), want[:10])
    np.testing.assert_array_equal(s.uniform(7, 4321), want[4321:4328])  # a jump forward
    np.testing.assert_array_equal(s.uniform(3, 2), want[2:5])  # and back


def test_a_block_equals_the_same_positions_drawn_one_by_one_in_any_order():
    block = Stream(11, 2).uniform(64, 100)
    single = Stream(11, 2)
    order = np.random.default_rng(0).permutation(64).tolist()  # positions are Python ints
    one_by_one = np.empty(64)
    for i in order:
        one_by_one[i] = single.uniform(1, 100 + i)[0]
    np.testing.assert_array_equal(one_by_one, block)
    # normals and integers are position-addressed the same way
    normals = Stream(11, 2).normal((4, 16), 100)
    np.testing.assert_array_equal(
        np.concatenate([Stream(11, 2).normal((16,), 100 + 16 * r) for r in range(4)]),
        normals.ravel())
    ints = Stream(11, 2).integers(5, 64, 100)
    np.testing.assert_array_equal([Stream(11, 2).integers(5, 1, 100 + i)[0] for i in range(64)], ints)


def test_a_retried_or_resumed_draw_is_identical():
    """Any number of other draws in between, or a new Stream object, give the same numbers."""
    s = Stream(5, 1)
    first = s.normal((3, 4), 240)
    s.uniform(1000, 0)
    s.integers(9, 17, 240)  # the same positions, read as something else
    np.testing.assert_array_equal(s.normal((3, 4), 240), first)
    np.testing.assert_array_equal(Stream(5, 1).normal((3, 4), 240), first)


def test_each_number_takes_exactly_one_position():
    """Consecutive calls that follow on from each other read disjoint, adjacent positions."""
    want = reference_uniforms(3, 1, 30)
    s = Stream(3, 1)
    u = s.uniform(10, 0)
    n = s.normal((2, 5), 10)
    k = s.integers(1000, 10, 20)
    np.testing.assert_array_equal(u, want[:10])
    np.testing.assert_allclose(n.ravel(), stats.norm.ppf(want[10:20]), rtol=1e-12)
    np.testing.assert_array_equal(k, np.floor(want[20:30] * 1000).astype(int))


def test_different_seeds_or_streams_give_different_numbers():
    """The driver, each worker (rank + 1) and the initial jitter never share numbers, nor do
    two seeds."""
    draws = {(seed, sid): Stream(seed, sid).uniform(200, 0)
             for seed in (0, 1, 2**40) for sid in (DRIVER_STREAM, 1, 2, 3, INIT_STREAM)}
    values = np.concatenate(list(draws.values()))
    assert len(np.unique(values)) == len(values)


def test_normals_and_integers_have_the_right_distribution():
    s = Stream(2024, 1)
    z = s.normal((20000,), 0)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    k = s.integers(7, 70000, 20000)
    assert k.min() == 0 and k.max() == 6
    assert stats.chisquare(np.bincount(k, minlength=7)).pvalue > 1e-3


def test_a_zero_uniform_gives_a_finite_normal(monkeypatch):
    """random() can return exactly 0.0, whose inverse CDF is -inf; the floor keeps it finite."""
    s = Stream(0, 0)
    monkeypatch.setattr(s, "uniform", lambda n, position: np.zeros(n))
    z = s.normal((3,), 0)
    assert np.all(np.isfinite(z)) and np.all(z < -5)


def test_check_seed_accepts_non_negative_ints_and_draws_a_fresh_one_for_none():
    assert check_seed(0) == 0
    assert check_seed(np.int64(42)) == 42 and type(check_seed(np.int64(42))) is int
    fresh = {check_seed(None) for _ in range(5)}
    assert len(fresh) == 5 and all(0 <= s < 2**63 for s in fresh)
    for bad, err in [(True, TypeError), (1.0, TypeError), ("3", TypeError), (-1, ValueError)]:
        with pytest.raises(err, match="random_seed"):
            check_seed(bad)


def test_a_numpy_integer_position_is_the_same_position():
    np.testing.assert_array_equal(Stream(3, 1).normal((4,), np.int64(10)),
                                  Stream(3, 1).normal((4,), 10))
