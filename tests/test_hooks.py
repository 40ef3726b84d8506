"""Hooks on their own: the divergence watch on synthetic loss traces, and in a real fit."""

import warnings

import numpy as np
import pytest

import distvi as dv
from distvi.driver.hooks import DivergenceWatch, Trace
from distvi.driver.step import StepInfo

from conftest import LinearRegression


def watch_over(losses, window=25):
    """Feed ``losses`` step by step to a watch; the steps at which it warned."""
    trace = Trace(len(losses), 0, scored=True)
    watch = DivergenceWatch(trace, window=window)
    warned = []
    for i, loss in enumerate(losses):
        info = StepInfo(loss, 1.0, 0.01, True)
        trace(None, info)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            watch(type("S", (), {"step": i + 1})(), info)
        warned += [i + 1 for w in rec if issubclass(w.category, dv.DivergenceWarning)]
    return warned


def test_a_noisy_stationary_loss_and_a_decreasing_one_are_not_divergent():
    rng = np.random.default_rng(0)
    assert watch_over(500 + 30 * rng.standard_t(3, size=5000)) == []
    assert watch_over(1e4 * np.exp(-np.arange(3000) / 300) + 50 * rng.normal(size=3000)) == []


def test_a_climbing_loss_is_said_once_at_the_first_window_past_the_rise():
    rng = np.random.default_rng(1)
    losses = np.concatenate([500 + 10 * rng.normal(size=200), 500 * 1.05 ** np.arange(1, 301)])
    # window medians: 500 until step 200, then 500 * 1.05**13 = 943 at step 225 (not yet
    # double the best), 500 * 1.05**38 = 3199 at 250 (high), 500 * 1.05**63 at 275 (high
    # and climbing): said at 275, and only then
    assert watch_over(losses) == [275]


def test_a_fit_whose_learning_rate_is_too_large_is_warned_before_it_breaks():
    lr = LinearRegression()
    inf = dv.ADVI(model=lr.factory, data=lr.data, random_seed=1)
    with pytest.warns(dv.DivergenceWarning, match=r"divergent: at step 100 .* climbing.* smaller learning rate"):
        with pytest.raises(dv.NotFiniteError):
            inf.fit(600, obj_optimizer=dv.sgd(learning_rate=0.00505), progressbar=False)


def test_a_noisy_fit_near_the_stable_limit_says_nothing():
    # sgd at 0.9 of the full-data stability limit on minibatches of 20 rows: the loss wanders
    # (window medians from 600 to 4,000) but does not climb away
    lr = LinearRegression()
    inf = dv.ADVI(model=lr.factory, data=lr.data, batch_size=20, random_seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dv.DivergenceWarning)
        inf.fit(3000, obj_optimizer=dv.sgd(learning_rate=0.0045), progressbar=False)
    assert np.isfinite(inf.hist).all()
