"""A PyMC user's variational code on distvi: callbacks both ways (distvi's in ``pymc.fit``,
PyMC's in ``distvi.fit``), ``Tracker``'s calling rule, bare optimizer functions, the NaN error
class, and ``sample(return_inferencedata=False)`` / ``Empirical`` with PyMC's ``MultiTrace``.

The answers are PyMC's own: its callbacks on the same fit, its ``MultiTrace`` for the same
model, its ``FloatingPointError``.
"""

import numpy as np
import pymc as pm
import pytensor
import pytest
from pymc.backends.base import MultiTrace

import distvi as dv
import distvi.inference
import distvi.programs
import distvi.model
import distvi.worker

EVERY = 5


@pytest.fixture(scope="module")
def model():
    """Normal data with unknown mean and (log-transformed) sd, and a deterministic."""
    y = np.random.default_rng(0).normal(1.0, 2.0, size=30)
    with pm.Model() as m:
        mu = pm.Normal("mu", 0.0, 10.0)
        s = pm.HalfNormal("s", 5.0)
        pm.Deterministic("d", mu / s)
        pm.Normal("y", mu, s, observed=y)
    return m


class Decisions:
    """Calls each check every step, noting the steps at which it raised StopIteration,
    without stopping the fit."""

    def __init__(self, **checks):
        self.checks, self.stops, self.calls = checks, {k: [] for k in checks}, []

    def __call__(self, approx, losses, i):
        self.calls.append(i)
        for key, check in self.checks.items():
            try:
                check(approx, losses, i)
            except StopIteration:
                self.stops[key].append(i)


def pair(**settings):
    return pm.callbacks.CheckParametersConvergence(**settings), dv.CheckParametersConvergence(**settings)


def decisions():
    rel_pm, rel_dv = pair(every=EVERY, tolerance=0.05, diff="relative")
    abs_pm, abs_dv = pair(every=EVERY, tolerance=0.05, diff="absolute", ord=2)
    stop_pm, stop_dv = pair(every=EVERY, tolerance=0.02, diff="relative")  # the first stops later
    return Decisions(rel_pm=rel_pm, rel_dv=rel_dv, abs_pm=abs_pm, abs_dv=abs_dv,
                     stop_pm=stop_pm, stop_dv=stop_dv)


def assert_same_decisions(rec):
    n_checks = len([i for i in rec.calls[1:] if i % EVERY == 0])
    for kind in ("rel", "abs"):
        ours, theirs = rec.stops[f"{kind}_dv"], rec.stops[f"{kind}_pm"]
        assert ours == theirs
        assert 0 < len(theirs) < n_checks  # the settings give both answers: a real comparison


# callables for both Trackers, each with the call PyMC makes of it
class NoSignature:
    """A callable that inspect.signature cannot read: both Trackers try f() first."""

    __signature__ = "unreadable"

    def __call__(self, approx, hist, i):
        return 2 * i


def with_default(approx, hist, i=0):  # f() fails: called as f(approx, hist, i)
    return len(hist)


def zero_with_defaults(a=1.5):  # f() works: called so
    return a


def tracked():
    return {
        "const": lambda: 1.0,
        "step": lambda ap, h, i: i,
        "star": lambda *t: len(t),  # PyMC calls it with nothing: 0
        "with_default": with_default,
        "zero_with_defaults": zero_with_defaults,
        "no_signature": NoSignature(),
        "builtin": dict,  # no signature either; dict() works
        "params": lambda ap, h, i: np.concatenate([p.get_value().ravel() for p in ap.params]),
    }


def assert_same_records(ours, theirs, keys):
    for key in keys:
        assert len(ours[key]) == len(theirs[key]) > 0
        for a, b in zip(ours[key], theirs[key]):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ 1, 2: callbacks in pymc.fit
def test_distvi_callbacks_in_pymc_fit_decide_and_stop_as_pymc_s(model):
    rec = decisions()
    stopper = dv.CheckParametersConvergence(every=EVERY, tolerance=0.02, diff="relative")
    ours, theirs = dv.Tracker(**tracked()), pm.callbacks.Tracker(**tracked())
    with model:
        approx = pm.fit(300, obj_optimizer=pm.adam(learning_rate=0.05), random_seed=1,
                        progressbar=False, callbacks=[rec, ours, theirs, stopper])
    assert_same_decisions(rec)
    # distvi's check stopped PyMC's fit at the step where PyMC's own would have
    assert stopper.converged_at is not None and rec.calls[-1] == stopper.converged_at < 300
    assert rec.stops["stop_pm"] == rec.stops["stop_dv"] == [stopper.converged_at]
    assert len(approx.hist) == stopper.converged_at - 1  # PyMC drops the stopping step's loss
    assert_same_records(ours, theirs, tracked())
    assert ours["star"][0] == 0 and ours["step"] == rec.calls
    np.testing.assert_array_equal(ours["params"][-1],
                                  np.concatenate([p.get_value().ravel() for p in approx.params]))


def test_pymc_callbacks_in_distvi_fit(model):
    # PyMC's own callbacks read approx.params and get_value(): they work on distvi's
    # approximation, and PyMC's check stops a distvi fit where distvi's does
    rec = decisions()
    stopper = pm.callbacks.CheckParametersConvergence(every=EVERY, tolerance=0.02, diff="relative")
    ours, theirs = dv.Tracker(**tracked()), pm.callbacks.Tracker(**tracked())
    inference = dv.ADVI(model=model, random_seed=1)
    approx = inference.fit(300, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False,
                           callbacks=[rec, ours, theirs, stopper])
    assert_same_decisions(rec)
    stop = rec.calls[-1]
    assert stop < 300 and rec.stops["stop_pm"] == rec.stops["stop_dv"] == [stop]
    assert len(inference.hist) == stop and inference.state.step == stop
    assert_same_records(ours, theirs, tracked())
    np.testing.assert_array_equal(theirs["params"][-1],
                                  np.concatenate([p.get_value().ravel() for p in approx.params]))


class FakeApprox:
    """Any PyMC-shaped approximation: ``params``, shared variables, and nothing else."""

    def __init__(self, *values):
        self.params = [pytensor.shared(np.asarray(v, dtype="float64")) for v in values]

    def set(self, *values):
        for p, v in zip(self.params, values):
            p.set_value(np.asarray(v, dtype="float64"))


@pytest.mark.parametrize("settings, pinned", [
    (dict(every=3, tolerance=1e-2, diff="relative"), False),
    (dict(every=3, tolerance=0.05, diff="relative", ord=1), False),
    (dict(every=3, tolerance=1e-2, diff="relative"), True),
    (dict(every=2, tolerance=1e-2, diff="absolute"), False),
    (dict(every=4, tolerance=0.02, diff="absolute", ord=2), True),
])
def test_check_parameters_convergence_follows_pymc_rule(settings, pinned):
    # parameters moving by shrinking random amounts, optionally one pinned at 0 (PyMC's eps
    # makes its relative change 1: never converged), steps that are and are not multiples of
    # `every`, and a step 0 (below `every`: skipped)
    rng = np.random.default_rng(7)
    ours = dv.CheckParametersConvergence(**settings)
    theirs = pm.callbacks.CheckParametersConvergence(**settings)
    approx = FakeApprox([0.0, 1.0], [[2.0]])
    got = {"dv": [], "pm": []}
    steps = [0, 0, *range(1, 80)]
    for k, i in enumerate(steps):
        scale = 0.5 ** (k / 8)
        first = 0.0 if pinned else 3 + scale * rng.normal()
        approx.set([first, 1 + scale * rng.normal()], [[2 + scale * rng.normal()]])
        for key, check in (("dv", ours), ("pm", theirs)):
            try:
                check(approx, None, i)
            except StopIteration:
                got[key].append(i)
    assert got["dv"] == got["pm"]
    assert ours.converged_at == (got["dv"][-1] if got["dv"] else None)
    n_checks = len([i for i in steps[2:] if i % settings["every"] == 0])
    if pinned and settings["diff"] == "relative":
        assert got["pm"] == []
    else:
        assert 0 < len(got["pm"]) < n_checks


def test_check_loss_convergence_reads_only_losses_and_step():
    # no approximation is needed, and a list of losses does as well as PyMC's array
    check = dv.CheckLossConvergence(window=4, tolerance=1e-2, every=1)
    losses = [10.0, 9.0, 8.0, 7.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    with pytest.raises(StopIteration):
        for n in range(1, len(losses) + 1):
            check(None, losses[:n], n)
    # the mean of the last 4 (5) against the 4 before: 8.5, 7.25, 6.25, 5.5, then 5
    assert check.stopped_at == 12
    np.testing.assert_allclose([c for _, c in check.changes],
                               [3.5 / 8.5, 2.25 / 7.25, 1.25 / 6.25, 0.5 / 5.5, 0.0])
    assert [i for i, _ in check.changes] == [8, 9, 10, 11, 12]


def test_tracker_refuses_a_callable_that_fits_neither_call():
    def two(a, b):
        return a

    with pytest.raises(TypeError, match=r"Tracker\(bad_one=\.\.\.\).*\(a, b\)"):
        dv.Tracker(ok=lambda: 1, bad_one=two)
    with pytest.raises(TypeError, match=r"Tracker\(x=\.\.\.\) needs a callable.*int"):
        dv.Tracker(x=3)
    # PyMC refuses it too, only later: at the first call
    with pytest.raises(TypeError):
        pm.callbacks.Tracker(bad_one=two)(FakeApprox([1.0]), np.zeros(1), 1)


def test_tracker_does_not_swallow_a_type_error_raised_inside():
    def broken():
        raise TypeError("raised inside the tracked function")

    with pytest.raises(TypeError, match="raised inside the tracked function"):
        dv.Tracker(broken=broken)(FakeApprox([1.0]), np.zeros(1), 1)
    # PyMC takes it for the wrong call and tries f(approx, hist, i), which hides it
    with pytest.raises(TypeError, match="positional argument"):
        pm.callbacks.Tracker(broken=broken)(FakeApprox([1.0]), np.zeros(1), 1)


def test_tracker_clear_and_missing_key_as_pymc():
    ours, theirs = dv.Tracker(a=lambda: 1), pm.callbacks.Tracker(a=lambda: 1)
    for t in (ours, theirs):
        t(None, None, 1)
        t(None, None, 2)
    assert ours["a"] == theirs["a"] == [1, 1] and ours["nothing"] == theirs["nothing"] == []
    ours.clear()
    theirs.clear()
    assert ours["a"] == theirs["a"] == []


# ------------------------------------------------------------------ 3: a bare optimizer function
OPTIMIZER_FUNCTIONS = ["sgd", "momentum", "nesterov_momentum", "adagrad", "adagrad_window",
                       "rmsprop", "adadelta", "adam", "adamax"]


def _tripwire(*args, **kwargs):
    raise AssertionError("work started before the bad input was reported")


@pytest.fixture
def no_work(monkeypatch):
    """As in test_errors: the compiled step, the shard workers and the data-term compiler
    are tripwires."""
    monkeypatch.setattr(distvi.programs, "compile_program", _tripwire)
    monkeypatch.setattr(distvi.programs, "compile_block", _tripwire)
    monkeypatch.setattr(distvi.worker, "ShardWorker", _tripwire)
    monkeypatch.setattr(distvi.model.ModelAdapter, "compile_data_term", _tripwire)


def fitted(model, n, **kwargs):
    inference = dv.ADVI(model=model, random_seed=5)
    inference.fit(n, progressbar=False, **kwargs)
    return inference


def test_bare_optimizer_function_is_that_optimizer_with_its_defaults(model):
    bare, called = fitted(model, 40, obj_optimizer=dv.adam), fitted(model, 40, obj_optimizer=dv.adam())
    assert bare._optimizer == dv.adam() and bare._optimizer.hyper["learning_rate"] == 0.001
    np.testing.assert_array_equal(bare.hist, called.hist)
    for a, b in zip(bare.approx.params_values, called.approx.params_values):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(bare.approx.mean, fitted(model, 0).approx.mean)  # it moved


@pytest.mark.parametrize("name", OPTIMIZER_FUNCTIONS)
def test_every_optimizer_function_is_taken_bare(no_work, linreg, name):
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=0)
    inference.fit(0, obj_optimizer=getattr(dv, name), progressbar=False)
    assert inference._optimizer == getattr(dv, name)()


@pytest.mark.parametrize("pymc_opt, ours", [
    (pm.adam, dv.adam()),
    (pm.adam(learning_rate=0.05), dv.adam(learning_rate=0.05)),
    (pm.adagrad_window(learning_rate=0.02, n_win=5), dv.adagrad_window(learning_rate=0.02, n_win=5)),
    (pm.momentum(learning_rate=0.01, momentum=0.8), dv.momentum(learning_rate=0.01, momentum=0.8)),
])
def test_pymc_optimizers_are_taken_as_distvi_s_of_the_same_name(model, pymc_opt, ours):
    theirs, mine = fitted(model, 30, obj_optimizer=pymc_opt), fitted(model, 30, obj_optimizer=ours)
    assert theirs._optimizer == ours
    np.testing.assert_array_equal(theirs.hist, mine.hist)


@pytest.mark.parametrize("optimizer, message", [
    (pm.variational.updates.apply_momentum, r"got apply_momentum; of PyMC's optimizers"),
    (lambda: dv.adam(), r"obj_optimizer must be one of distvi's optimizers.*got <lambda>$"),
    (dv.apply_momentum, r"got apply_momentum$"),
    (dv.optimizers.Optimizer, r"got Optimizer$"),
])
def test_other_callables_are_refused_before_any_work(no_work, linreg, optimizer, message):
    with pytest.raises(TypeError, match=message):
        dv.fit(10, model=linreg.factory, data=linreg.data, backend="local", random_seed=0,
               obj_optimizer=optimizer, progressbar=False)


# ------------------------------------------------------------------ 4: one error for NaN
@pytest.mark.parametrize("error", [FloatingPointError, ValueError, dv.NotFiniteError])
@pytest.mark.parametrize("make", [lambda: dv.adam(learning_rate=float("nan")),
                                  lambda: dv.sgd(learning_rate=np.inf),
                                  lambda: dv.adagrad_window(epsilon=np.nan)])
def test_nan_hyperparameter_is_both_errors(make, error):
    with pytest.raises(error, match="must be finite"):
        make()


@pytest.mark.parametrize("error", [FloatingPointError, ValueError])
def test_nan_schedule_is_refused_before_any_work(no_work, linreg, tmp_path, error):
    store = tmp_path / "run.zarr"
    with pytest.raises(error, match=r"`learning_rate\(0\)` must be finite, got nan"):
        dv.fit(10, model=linreg.factory, data=linreg.data, backend="local", random_seed=0,
               obj_optimizer=dv.adam(learning_rate=lambda t: float("nan")), progressbar=False,
               store=str(store))
    assert not store.exists()


@pytest.fixture(scope="module")
def sgd_inference(linreg):
    """One sgd ADVI for the NaN tests: one compiled step (a schedule enters it as an input)."""
    return dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=0)


def test_nan_schedule_during_the_fit(sgd_inference):
    inference = sgd_inference
    with pytest.raises(dv.NotFiniteError, match=r"`learning_rate\(5\)` must be finite, got nan") as info:
        inference.fit(50, obj_optimizer=dv.sgd(learning_rate=lambda t: 1e-4 if t < 5 else np.nan),
                      progressbar=False)
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, ValueError)
    assert inference.state.step == 5 and len(inference.hist) == 5 and np.isfinite(inference.hist).all()
    assert np.isfinite(inference.approx.mean).all()


def test_nan_schedule_where_a_refine_starts_is_refused_before_workers_start(sgd_inference, monkeypatch):
    inference = sgd_inference
    inference.fit(5, obj_optimizer=dv.sgd(learning_rate=lambda t: 1e-4 if t < 5 else np.nan),
                  progressbar=False)
    inference.close()
    step = inference.state.step
    monkeypatch.setattr(distvi.worker, "ShardWorker", _tripwire)
    with pytest.raises(FloatingPointError, match=r"`learning_rate\(5\)` must be finite"):
        inference.refine(10, progressbar=False)
    assert inference.state.step == step


@pytest.mark.parametrize("error", [FloatingPointError, ValueError])
def test_nan_loss_is_both_errors(sgd_inference, error):
    # sgd at 0.01 on 400 rows overshoots until the loss overflows (see test_errors); a second
    # fit starts from the last finite parameters and overflows again (at once, maybe)
    inference = sgd_inference
    hist0 = len(inference.hist)
    with pytest.raises(error, match=r"NaN or inf at step \d+.*'w'.*keeps the last finite"):
        inference.fit(300, obj_optimizer=dv.sgd(learning_rate=0.01), progressbar=False)
    assert hist0 <= len(inference.hist) < hist0 + 300 and np.isfinite(inference.hist).all()
    assert np.isfinite(inference.approx.mean).all()


# ------------------------------------------------------------------ 5: MultiTrace
@pytest.fixture(scope="module")
def pymc_trace(model):
    """PyMC's own approx.sample(return_inferencedata=False) on the model."""
    with model:
        approx = pm.fit(50, random_seed=2, progressbar=False)
    return approx.sample(20, return_inferencedata=False, random_seed=3)


@pytest.fixture(scope="module")
def distvi_approx(model):
    return dv.fit(50, model=model, random_seed=2, progressbar=False)


@pytest.mark.parametrize("kwargs", [{}, {"include_transformed": True}, {"include_transformed": False}])
def test_sample_as_multitrace_matches_pymc_s(distvi_approx, pymc_trace, kwargs):
    trace = distvi_approx.sample(20, return_inferencedata=False, random_seed=4, **kwargs)
    assert type(trace) is MultiTrace and type(pymc_trace) is MultiTrace
    assert trace.varnames == pymc_trace.varnames == ["mu", "s_log__", "s", "d"]
    assert trace.chains == pymc_trace.chains == [0] and len(trace) == len(pymc_trace) == 20
    for name in trace.varnames:
        assert trace[name].shape == pymc_trace[name].shape
        assert trace[name].dtype == pymc_trace[name].dtype
    # the same draws as the InferenceData of the same seed, each variable consistent
    idata = distvi_approx.sample(20, random_seed=4, include_transformed=True)
    for name in trace.varnames:
        np.testing.assert_array_equal(trace[name], idata.posterior[name].values[0])
    np.testing.assert_allclose(trace["s"], np.exp(trace["s_log__"]), rtol=1e-14)
    np.testing.assert_allclose(trace["d"], trace["mu"] / trace["s"], rtol=1e-14)
    point = trace.point(3)
    assert set(point) == set(trace.varnames) and point["mu"] == trace["mu"][3]


def test_multitrace_goes_on_to_inferencedata_with_pymc(model, distvi_approx):
    trace = distvi_approx.sample(10, return_inferencedata=False, random_seed=4)
    with model:
        idata = pm.to_inference_data(trace)
    np.testing.assert_array_equal(idata.posterior["s"].values[0], trace["s"])
    assert "s_log__" not in idata.posterior  # as PyMC converts its own


@pytest.mark.parametrize("source", ["pymc_approx", "pm_sample"])
def test_empirical_from_multitrace_equals_from_inferencedata(model, pymc_trace, source):
    if source == "pymc_approx":
        trace = pymc_trace
    else:
        with model:
            trace = pm.sample(draws=15, tune=15, chains=2, cores=1, random_seed=6, progressbar=False,
                              compute_convergence_checks=False, return_inferencedata=False)
    with model:
        idata = pm.to_inference_data(trace)  # the constrained values only
    assert "s_log__" in trace.varnames and "s_log__" not in idata.posterior
    from_trace, from_idata = dv.Empirical(trace, model=model), dv.Empirical(idata, model=model)
    n = len(trace) * trace.nchains
    # PyMC's Empirical reads every chain's value variables, chain after chain
    expected = np.column_stack([trace.get_values("mu"), trace.get_values("s_log__")])
    assert from_trace.histogram.shape == (n, 2)
    np.testing.assert_array_equal(from_trace.histogram, expected)
    np.testing.assert_allclose(from_idata.histogram, from_trace.histogram, rtol=1e-12, atol=1e-14)


def test_sample_as_multitrace_from_a_factory_fit(logistic_data):
    # PyMC's trace records model.unobserved_value_vars: its varnames and per-draw shapes
    from conftest import logistic_factory

    approx = dv.fit(20, model=logistic_factory, data=logistic_data, backend="local",
                    random_seed=0, progressbar=False)
    trace = approx.sample(6, return_inferencedata=False, random_seed=1)
    ready = logistic_factory(logistic_data)
    expected = [v.name for v in ready.unobserved_value_vars]
    assert trace.varnames == expected == ["w", "b", "s_log__", "s", "w_scaled"]
    point = ready.initial_point()
    shapes = dict(zip(expected, (np.shape(v) for v in ready.compile_fn(
        ready.unobserved_value_vars, inputs=ready.value_vars, on_unused_input="ignore")(point))))
    assert {k: trace[k].shape[1:] for k in expected} == shapes
    np.testing.assert_allclose(trace["w_scaled"], trace["w"] * trace["s"][:, None], rtol=1e-14)


def test_tracker_star_args_wanting_the_arguments_get_them_as_in_pymc():
    """``lambda *t: t[-1]`` fails called bare; PyMC then calls it with (approx, hist, i)."""
    fn = lambda *t: t[-1]  # noqa: E731
    ours, theirs = dv.Tracker(i=fn), pm.callbacks.Tracker(i=fn)
    for step in (1, 2, 3):
        ours(None, [], step)
        theirs(None, [], step)
    assert ours["i"] == theirs["i"] == [1, 2, 3]
