"""The shared argument checks: a bool is not an int, numpy numbers are numbers, and each
refusal names the argument."""

import numpy as np
import pytest

from distvi import _validate


@pytest.mark.parametrize("value, is_int, is_real", [
    (3, True, True), (np.int64(3), True, True), (True, False, False), (np.bool_(True), False, False),
    (2.5, False, True), (np.float32(2.5), False, True), ("3", False, False), (None, False, False),
])
def test_what_counts_as_an_int_and_a_number(value, is_int, is_real):
    assert _validate.is_int(value) is is_int and _validate.is_real(value) is is_real


def test_positive_int_names_the_argument_and_allows_none_only_when_asked():
    assert _validate.positive_int("batch_size", np.int32(4)) == 4
    assert _validate.positive_int("batch_size", None, allow_none=True) is None
    with pytest.raises(TypeError, match="batch_size must be an int, got bool"):
        _validate.positive_int("batch_size", True)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        _validate.positive_int("batch_size", 0)
    with pytest.raises(TypeError, match="batch_size must be an int, got NoneType"):
        _validate.positive_int("batch_size", None)


def test_steps_bounds():
    assert _validate.steps(0) == 0
    with pytest.raises(ValueError, match="n must be >= 0"):
        _validate.steps(-1)
    with pytest.raises(ValueError, match="n must be <= 1e\\+09 steps per fit"):
        _validate.steps(_validate.MAX_STEPS + 1)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        _validate.steps(10.0)


def test_average_from_is_a_fraction_of_n_or_a_number_of_steps():
    assert _validate.average_from(None, 100) is None
    assert _validate.average_from(0.25, 100) == 25
    assert _validate.average_from(np.float64(0.5), 101) == 50  # round half to even
    assert _validate.average_from(30, 100) == 30
    with pytest.raises(ValueError, match=r"fraction of n must be in \[0, 1\)"):
        _validate.average_from(1.0, 100)
    with pytest.raises(ValueError, match=r"must be in \[0, n=100\)"):
        _validate.average_from(100, 100)
    with pytest.raises(TypeError, match="got bool"):
        _validate.average_from(False, 100)


def test_max_norm_and_fit_keywords():
    assert _validate.max_norm(None) is None and _validate.max_norm(2) == 2.0
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="total_grad_norm_constraint must be > 0"):
            _validate.max_norm(bad)
    with pytest.raises(TypeError, match="'more_updates' is not supported by distvi's ADVI"):
        _validate.no_fit_keywords({"more_updates": {}}, "ADVI")
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        _validate.no_fit_keywords({"lr": 0.1}, "ADVI")
