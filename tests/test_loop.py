"""The loop with a fake backend and fake hooks: what it calls, in which order, when it stops,
and what state it leaves; with exact gradients from the fake backend it reaches the
closed-form posterior."""

import numpy as np
import pytest

import distvi as dv
from distvi._rng import DRIVER_STREAM, Stream
from distvi.driver.loop import Loop
from distvi.driver.step import Step, compile_program

from conftest import LinearRegression

LR = LinearRegression(n_rows=200, n_coef=2, seed=4)


class ExactBackend:
    """The full-data log-likelihood of LR and its gradient at each point, in closed form."""

    num_workers = 1

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def evaluate(self, points, step, with_logp=True):
        self.calls.append(step)
        if step == self.fail_at:
            raise RuntimeError("worker lost")
        r = LR.y[None, :] - points @ LR.X.T
        logp = -0.5 * (r**2).sum(axis=1) / LR.sigma**2 - 0.5 * len(LR.y) * np.log(2 * np.pi * LR.sigma**2)
        return logp, r @ LR.X / LR.sigma**2


class Calls:
    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def __call__(self, state, info):
        self.seen.append((state.step, info.loss))
        if state.step == self.stop_at:
            raise StopIteration


def make_step(n_mc=1, lr=0.05):
    inf = dv.FullRankADVI(model=LR.factory, data=LR.data, random_seed=2)
    opt = dv.adam(learning_rate=lr)
    program = compile_program(inf.approx, inf.objective, opt, n_mc, n_mc, None)
    step = Step(program, inf.approx, inf.objective, opt, Stream(2, DRIVER_STREAM))
    return step, step.init(inf.approx.params_values)


def test_hooks_see_every_step_in_order_and_the_backend_the_step_counter():
    step, state = make_step()
    first, second = Calls(), Calls()
    backend = ExactBackend()
    out = Loop(step, backend, [first, second]).run(state, 5)
    assert backend.calls == [0, 1, 2, 3, 4]
    assert [s for s, _ in first.seen] == [1, 2, 3, 4, 5] and first.seen == second.seen
    assert out.step == 5 and out.draw_position == 5 * 2


def test_a_hook_raising_stopiteration_ends_the_run_after_that_step():
    step, state = make_step()
    stopper, after = Calls(stop_at=3), Calls()
    loop = Loop(step, ExactBackend(), [stopper, after])
    assert loop.run(state, 10).step == 3
    assert [s for s, _ in after.seen] == [1, 2]  # hooks after the stopper do not see step 3


def test_an_error_leaves_the_last_whole_state():
    step, state = make_step()
    loop = Loop(step, ExactBackend(fail_at=4), [])
    with pytest.raises(RuntimeError, match="worker lost"):
        loop.run(state, 10)
    assert loop.state.step == 4


def test_two_runs_of_k_steps_equal_one_run_of_2k():
    step, state = make_step()
    straight = Loop(step, ExactBackend()).run(state, 40)
    half = Loop(step, ExactBackend()).run(state, 20)
    again = Loop(step, ExactBackend()).run(half, 20)
    for a, b in zip(straight.params, again.params):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_exact_gradients_reach_the_closed_form_posterior():
    step, state = make_step(n_mc=8, lr=0.02)
    losses = Calls()
    state = Loop(step, ExactBackend(), [losses]).run(state, 3000)
    approx = step.approx
    approx.params_values = state.params
    sd = np.sqrt(LR.cov.diagonal())
    np.testing.assert_allclose(approx.mean, LR.mean, atol=0.2 * sd.min())
    np.testing.assert_allclose(approx.std, sd, rtol=0.1)
    corr = approx.cov / np.outer(approx.std, approx.std)
    np.testing.assert_allclose(corr, LR.cov / np.outer(sd, sd), atol=0.1)
    # the loss estimates settle around -log evidence (the KL is ~0 for a full-rank q)
    np.testing.assert_allclose(np.mean([l for _, l in losses.seen[-500:]]), -LR.log_evidence,
                               rtol=0.01)
