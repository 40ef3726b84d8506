"""Callbacks: ``cb(approx, losses, i)`` after every step, as in PyMC; StopIteration and
KeyboardInterrupt end a fit cleanly; CheckParametersConvergence and Tracker."""

import numpy as np
import pytest

import distvi as dv

# One optimizer object for the shared inference, so its compiled step is reused by every fit.
OPT = dv.adam(learning_rate=0.05)


@pytest.fixture(scope="module")
def inference(linreg):
    """A mean-field ADVI on linreg shared by the tests; each test measures what its own
    fit adds (steps and losses accumulate across fits)."""
    return dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=3)


def steps_done(inference):
    return 0 if inference.state is None else inference.state.step


def run(inference, n, callbacks):
    return inference.fit(n, callbacks=callbacks, obj_optimizer=OPT, progressbar=False)


def test_callback_gets_approx_growing_losses_and_step(inference):
    calls = []
    step0, hist0 = steps_done(inference), len(inference.hist)
    run(inference, 30, [lambda approx, losses, i: calls.append((approx, np.array(losses), i))])
    assert len(calls) == 30
    assert all(approx is inference.approx for approx, _, _ in calls)
    assert [len(losses) for _, losses, _ in calls] == list(range(1, 31))
    assert [i for _, _, i in calls] == list(range(step0 + 1, step0 + 31))  # PyMC's i + s + 1
    np.testing.assert_array_equal(calls[-1][1], inference.hist[hist0:])


def test_callback_sees_the_parameters_of_its_step(inference):
    means = []
    run(inference, 10, [lambda approx, losses, i: means.append(np.array(approx.mean))])
    assert all(not np.array_equal(a, b) for a, b in zip(means, means[1:]))
    np.testing.assert_array_equal(means[-1], inference.approx.mean)


def stop_at(k, exc, seen):
    def callback(approx, losses, i):
        seen.append((np.array(approx.mean), np.array(losses)))
        if len(losses) == k:
            raise exc

    return callback


def test_stop_iteration_ends_the_fit_keeping_k_losses_and_params(inference):
    seen, step0, hist0 = [], steps_done(inference), len(inference.hist)
    approx = run(inference, 200, [stop_at(17, StopIteration("enough"), seen)])
    assert approx is inference.approx
    assert len(seen) == 17 and len(inference.hist) == hist0 + 17
    assert inference.state.step == step0 + 17
    np.testing.assert_array_equal(inference.approx.mean, seen[-1][0])
    np.testing.assert_array_equal(inference.hist[hist0:], seen[-1][1])


def test_keyboard_interrupt_ends_the_fit_cleanly_keeping_every_loss(inference):
    seen, step0, hist0 = [], steps_done(inference), len(inference.hist)
    approx = run(inference, 200, [stop_at(23, KeyboardInterrupt(), seen)])
    assert approx is inference.approx
    assert len(inference.hist) == hist0 + 23 and inference.state.step == step0 + 23
    assert np.all(np.isfinite(inference.hist[hist0:]))
    np.testing.assert_array_equal(inference.hist[hist0:], seen[-1][1])
    np.testing.assert_array_equal(inference.approx.mean, seen[-1][0])


def test_tracker_records_one_value_per_step(inference):
    approx = inference.approx
    tracker = dv.Tracker(mean=lambda: approx.mean.copy(), loss=lambda ap, losses, i: losses[-1],
                         i=lambda ap, losses, i: i)
    step0, hist0 = steps_done(inference), len(inference.hist)
    run(inference, 40, [tracker])
    assert len(tracker["mean"]) == len(tracker["loss"]) == 40
    assert tracker["i"] == list(range(step0 + 1, step0 + 41))
    np.testing.assert_array_equal(tracker["loss"], inference.hist[hist0:])
    np.testing.assert_array_equal(tracker["mean"][-1], approx.mean)
    assert not np.array_equal(tracker["mean"][0], tracker["mean"][-1])


def test_convergence_check_does_not_stop_a_moving_fit(inference):
    check = dv.CheckParametersConvergence(every=50, tolerance=1e-12)
    hist0 = len(inference.hist)
    run(inference, 120, [check])
    assert check.converged_at is None and len(inference.hist) == hist0 + 120


def test_convergence_check_stops_a_converged_fit_early(linreg):
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=0)
    check = dv.CheckParametersConvergence(every=100, tolerance=1e-3, diff="relative")
    # full batch, adam with an exponentially decaying rate: the parameters settle
    inference.fit(20000, obj_optimizer=dv.adam(learning_rate=lambda t: 0.05 * 0.999**t),
                  callbacks=[check], progressbar=False)
    assert check.converged_at is not None and check.converged_at < 10000
    assert check.converged_at % 100 == 0 and len(inference.hist) == check.converged_at
    # and it stopped at the answer: the closed-form posterior
    np.testing.assert_allclose(inference.approx.mean, linreg.mean, atol=0.01)
    np.testing.assert_allclose(inference.approx.std, np.sqrt(np.diag(linreg.cov)), rtol=0.1)
