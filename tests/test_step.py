"""The step as a value: ``Step.draw`` and ``Step.update`` against hand-computed gradients and
optimizer steps, with the workers' answers given by hand."""

import numpy as np
import pymc as pm
import pytest
from scipy.special import expit, log1p

import distvi as dv
from distvi._rng import DRIVER_STREAM, Stream
from distvi.driver.step import Step, StepInfo, compile_program

LOG_2PI = np.log(2 * np.pi)
D = 2


def factory(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=D)
        pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
    return m


DATA = {"X": np.ones((10, D)), "y": np.zeros(10)}


def make_step(opt, n_mc=1, max_norm=None, fullrank=False, average_start=None):
    cls = dv.FullRankADVI if fullrank else dv.ADVI
    inf = cls(model=factory, data=DATA, random_seed=5)
    program = compile_program(inf.approx, inf.objective, opt, n_mc, n_mc, max_norm)
    step = Step(program, inf.approx, inf.objective, opt, Stream(5, DRIVER_STREAM),
                average_start=average_start)
    return step, inf.approx


def softplus(x):
    return log1p(np.exp(x))


def hand_gradient(mu, rho, eps, datagrad):
    """d loss / d (mu, rho) of the mean-field loss -datalogp - log N(z; 0, I) - H[q] at
    z = mu + softplus(rho) eps, with d datalogp / dz = datagrad (one draw)."""
    z = mu + softplus(rho) * eps
    dz = -(datagrad - z)  # d loss / dz: the data term's and the N(0, 1) prior's
    return dz, dz * eps * expit(rho) - expit(rho) / softplus(rho)


def test_draw_is_mean_plus_scale_times_the_stream_normals():
    step, approx = make_step(dv.sgd(learning_rate=0.1))
    state = step.init([np.array([0.5, -1.0]), np.array([0.2, -0.3])])
    eps = Stream(5, DRIVER_STREAM).normal((1, D), 0)
    np.testing.assert_allclose(step.draw(state), [0.5, -1.0] + softplus(np.array([0.2, -0.3])) * eps,
                               rtol=1e-14)


def test_sgd_update_equals_the_hand_computed_gradient_step():
    step, approx = make_step(dv.sgd(learning_rate=0.1))
    mu, rho = np.array([0.5, -1.0]), np.array([0.2, -0.3])
    state = step.init([mu, rho])
    points = step.draw(state)
    eps = step.normals.at(0)[0]
    datalogp, datagrad = np.array([-3.0]), np.array([[1.5, -0.5]])
    new, info, _ = step.update(state, points, (datalogp, datagrad))
    g_mu, g_rho = hand_gradient(mu, rho, eps, datagrad[0])
    np.testing.assert_allclose(new.params[0], mu - 0.1 * g_mu, rtol=1e-12)
    np.testing.assert_allclose(new.params[1], rho - 0.1 * g_rho, rtol=1e-12)
    z = points[0]
    loss = 3.0 - (-0.5 * z @ z - D / 2 * LOG_2PI) - (np.log(softplus(rho)).sum() + D / 2 * (1 + LOG_2PI))
    assert isinstance(info, StepInfo) and info.ok and info.lr == 0.1
    np.testing.assert_allclose(info.loss, loss, rtol=1e-12)
    np.testing.assert_allclose(info.grad_norm, np.sqrt(g_mu @ g_mu + g_rho @ g_rho), rtol=1e-12)
    assert (new.step, new.opt_step, new.draw_position) == (1, 1, D)


def test_adam_first_step_and_its_named_state():
    b1, b2, lr, e = 0.9, 0.999, 0.01, 1e-8
    step, approx = make_step(dv.adam(learning_rate=lr, beta1=b1, beta2=b2, epsilon=e))
    mu, rho = np.zeros(D), np.zeros(D)
    state = step.init([mu, rho])
    points = step.draw(state)
    new, info, _ = step.update(state, points, (np.zeros(1), np.array([[2.0, -1.0]])))
    g_mu, g_rho = hand_gradient(mu, rho, step.normals.at(0)[0], np.array([2.0, -1.0]))
    a_t = lr * np.sqrt(1 - b2) / (1 - b1)
    for p, g, got in ((mu, g_mu, new.params[0]), (rho, g_rho, new.params[1])):
        m, v = (1 - b1) * g, (1 - b2) * g**2
        np.testing.assert_allclose(got, p - a_t * m / (np.sqrt(v) + e), rtol=1e-12)
    (m_mu, v_mu), _ = new.opt_state.slots
    np.testing.assert_allclose(m_mu, (1 - b1) * g_mu, rtol=1e-12)
    np.testing.assert_allclose(v_mu, (1 - b2) * g_mu**2, rtol=1e-12)
    assert new.opt_state.counters == (1.0,)
    assert len(new.opt_state.flat) == 5


def test_clip_scales_the_whole_gradient_to_the_norm():
    step, approx = make_step(dv.sgd(learning_rate=1.0), max_norm=0.5)
    mu, rho = np.zeros(D), np.zeros(D)
    state = step.init([mu, rho])
    new, info, _ = step.update(state, step.draw(state), (np.zeros(1), np.array([[30.0, -40.0]])))
    g = np.concatenate(hand_gradient(mu, rho, step.normals.at(0)[0], np.array([30.0, -40.0])))
    moved = np.concatenate([new.params[0] - mu, new.params[1] - rho])
    # to the norm up to the constraint's epsilon (1e-7, as PyMC's total_norm_constraint)
    np.testing.assert_allclose(moved, -0.5 * g / np.linalg.norm(g), rtol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(moved), 0.5, rtol=1e-7)
    np.testing.assert_allclose(info.grad_norm, np.linalg.norm(g), rtol=1e-12)


def test_update_is_pure_and_the_next_points_are_the_next_draw():
    step, _ = make_step(dv.adam(learning_rate=0.05), n_mc=3, fullrank=True)
    state = step.init([np.zeros(D), np.array([0.5, 0.0, 0.5])])
    points = step.draw(state)
    answers = (np.zeros(3), np.ones((3, D)))
    a, _, next_a = step.update(state, points, answers)
    b, _, next_b = step.update(state, points, answers)
    for x, y in zip(a.params, b.params):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(next_a, next_b)
    np.testing.assert_allclose(next_a, step.draw(a), rtol=1e-14)
    assert state.step == 0 and state.opt_state.counters == (0.0,)


def test_a_non_finite_answer_raises_and_names_the_variable():
    step, _ = make_step(dv.sgd(learning_rate=0.1))
    state = step.init([np.zeros(D), np.zeros(D)])
    with pytest.raises(dv.NotFiniteError, match=r"NaN or inf at step 0.*variables: \['w'\]"):
        step.update(state, step.draw(state), (np.zeros(1), np.array([[0.0, np.nan]])))


def test_averaging_starts_after_its_step():
    step, _ = make_step(dv.sgd(learning_rate=0.1), average_start=1)
    state = step.init([np.zeros(D), np.zeros(D)])
    iterates = []
    for _ in range(3):
        state, _, points = step.update(state, step.draw(state), (np.zeros(1), np.ones((1, D))))
        iterates.append(state.params[0])
    assert state.n_averaged == 2
    np.testing.assert_allclose(state.average[0], (iterates[1] + iterates[2]) / 2, rtol=1e-14)
    np.testing.assert_array_equal(state.result[0], state.average[0])
