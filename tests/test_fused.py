"""Fused step blocks: the same numbers as the per-step path, on every setting a fit takes;
blocks of any size give identical numbers; they end where hooks need a whole state; a
non-finite step is named exactly."""

import numpy as np
import pymc as pm
import pytest

import distvi as dv
from distvi.driver import fused as fused_module

from conftest import LinearRegression

LR = LinearRegression(n_rows=300, n_coef=3, seed=7)
RTOL = 1e-10


def _params(inf):
    return np.concatenate([np.ravel(p) for p in inf.approx.params_values])


def _fit(method, fused, n=300, fit_kw=None, **kw):
    kw.setdefault("batch_size", 50)
    kw.setdefault("random_seed", 5)
    inf = method(model=LR.factory, data=LR.data, backend="local",
                 backend_options={"fused": fused}, **kw)
    inf.fit(n, progressbar=False, **(fit_kw or {}))
    return inf


CASES = {
    "mean-field, 2 shards": (dv.ADVI, {"num_workers": 2}, {}),
    "full-rank, full batch": (dv.FullRankADVI, {"batch_size": None}, {}),
    "obj_n_mc=3, clipped": (dv.ADVI, {}, {"obj_n_mc": 3, "total_grad_norm_constraint": 50.0}),
    "full-rank, stl, beta": (dv.FullRankADVI, {"beta": 0.5, "stl": True}, {}),
    "schedule, averaging": (dv.ADVI, {}, {"obj_optimizer": dv.adam(learning_rate=lambda t: 0.05 / (1 + t / 50)),
                                          "average_from": 0.5}),
    "sgd momentum": (dv.ADVI, {"num_workers": 3}, {"obj_optimizer": dv.momentum(learning_rate=1e-4)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_blocks_give_the_per_step_numbers(case):
    method, kw, fit_kw = CASES[case]
    runs = [_fit(method, fused, fit_kw=fit_kw, **kw) for fused in (False, True)]
    step, block = runs
    np.testing.assert_allclose(_params(block), _params(step), rtol=RTOL)
    np.testing.assert_allclose(block.hist, step.hist, rtol=RTOL)
    assert block.state.step == step.state.step == 300
    assert block.state.draw_position == step.state.draw_position
    assert block.state.n_averaged == step.state.n_averaged
    for a, b in zip(block.state.opt_state.flat, step.state.opt_state.flat):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-300)


def test_the_group_api_runs_fused_with_the_per_step_numbers():
    runs = []
    for fused in (False, True):
        with LR.factory(LR.data) as model:
            w = model["w"]
            approx = dv.Approximation([dv.Group([w], vfam="fr")])
        inf = dv.KLqp(approx, model=LR.factory, data=LR.data, batch_size=60, random_seed=3,
                      backend_options={"fused": fused})
        inf.fit(200, progressbar=False)
        runs.append(inf)
    np.testing.assert_allclose(_params(runs[1]), _params(runs[0]), rtol=RTOL)


class EverySeven:
    """A callback that declares it needs calls only at the first step and multiples of 7."""

    call_every = 7

    def __init__(self):
        self.steps = []

    def __call__(self, approx, losses, i):
        self.steps.append(i)


def test_block_sizes_change_no_number_and_blocks_end_where_callbacks_are_due(monkeypatch):
    plain = _fit(dv.ADVI, True, n=250)
    cb = EverySeven()
    inf = dv.ADVI(model=LR.factory, data=LR.data, batch_size=50, random_seed=5)
    inf.fit(250, progressbar=False, callbacks=[cb])
    assert cb.steps == [1, *range(7, 251, 7)]
    np.testing.assert_array_equal(_params(inf), _params(plain))
    np.testing.assert_array_equal(inf.hist, plain.hist)
    monkeypatch.setattr(fused_module, "MAX_BLOCK", 3)  # blocks of at most 3 steps
    small = _fit(dv.ADVI, True, n=250)
    np.testing.assert_array_equal(_params(small), _params(plain))


def test_a_callback_without_call_every_sees_every_step_on_the_per_step_path():
    seen = []
    inf = dv.ADVI(model=LR.factory, data=LR.data, batch_size=50, random_seed=5)
    inf.fit(40, progressbar=False, callbacks=[lambda approx, losses, i: seen.append((i, len(losses)))])
    assert seen == [(i, i) for i in range(1, 41)]
    np.testing.assert_array_equal(_params(inf), _params(_fit(dv.ADVI, False, n=40)))
    np.testing.assert_allclose(_params(inf), _params(_fit(dv.ADVI, True, n=40)), rtol=RTOL)


def test_check_parameters_convergence_stops_at_the_per_step_step():
    stops = []
    for fused in (False, True):
        cb = dv.callbacks.CheckParametersConvergence(every=50, tolerance=0.05)
        inf = dv.ADVI(model=LR.factory, data=LR.data, batch_size=None, random_seed=5,
                      backend_options={"fused": fused})
        inf.fit(5000, progressbar=False, callbacks=[cb])
        stops.append((cb.converged_at, inf.state.step))
    assert stops[0] == stops[1] and stops[0][0] is not None and stops[0][0] < 5000


def _runaway(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
    return m


def test_a_non_finite_step_is_named_exactly_with_the_last_finite_state_kept():
    outcomes = []
    for fused in (False, True):
        inf = dv.ADVI(model=_runaway, data={"X": LR.X * 1e30, "y": LR.y}, batch_size=None,
                      random_seed=1, backend_options={"fused": fused})
        with pytest.raises(FloatingPointError, match=r"NaN or inf at step (\d+)") as err:
            inf.fit(500, obj_optimizer=dv.sgd(learning_rate=1e-3), progressbar=False)
        outcomes.append((str(err.value), inf.state.step, _params(inf)))
    (msg_a, step_a, p_a), (msg_b, step_b, p_b) = outcomes
    assert step_a == step_b > 0 and msg_a == msg_b
    assert f"at step {step_a}" in msg_a and "'w'" in msg_a
    assert np.all(np.isfinite(p_b))
    np.testing.assert_allclose(p_b, p_a, rtol=RTOL)


def test_a_fit_until_converged_runs_fused_to_the_per_step_answer():
    runs = []
    for fused in (False, True):
        inf = dv.ADVI(model=LR.factory, data=LR.data, batch_size=100, random_seed=2,
                      backend_options={"fused": fused})
        inf.fit(None, progressbar=False, max_n=20_000)
        runs.append(inf)
    step, block = runs
    assert block.convergence.step == step.convergence.step
    assert [p.end_step for p in block.convergence.phases] == [p.end_step for p in step.convergence.phases]
    np.testing.assert_allclose(_params(block), _params(step), rtol=RTOL)


def test_a_checkpointed_run_resumes_fused_to_the_uninterrupted_numbers(tmp_path):
    whole = _fit(dv.ADVI, True, n=200)
    inf = dv.ADVI(model=LR.factory, data=LR.data, batch_size=50, random_seed=5)
    inf.fit(120, progressbar=False, store=str(tmp_path / "run.zarr"), checkpoint_every=30)
    again = dv.ADVI(model=LR.factory, data=LR.data, batch_size=50, random_seed=5)
    again.fit(200, progressbar=False, store=str(tmp_path / "run.zarr"), checkpoint_every=30,
              resume=True)
    np.testing.assert_array_equal(_params(again), _params(whole))


def test_fused_must_be_a_bool():
    with pytest.raises(ValueError, match=r"backend_options\['fused'\] must be True or False"):
        dv.ADVI(model=LR.factory, data=LR.data, backend_options={"fused": "yes"})


def test_an_unknown_block_form_is_refused(monkeypatch):
    monkeypatch.setenv("DISTVI_BLOCK_FORM", "fortran")
    with pytest.raises(ValueError, match="DISTVI_BLOCK_FORM must be one of"):
        _fit(dv.ADVI, True, n=5)
