"""Bad inputs fail fast, with the right exception type and a message naming the problem.

Every bad-input test takes the ``no_work`` fixture: it replaces the driver's compiled step,
the shard workers and the data-term compiler with tripwires, so an error that is only
reported after work has started fails the test with an AssertionError instead of the
expected exception. Data errors are also checked to come before the model factory runs.
"""

import re

import numpy as np
import pymc as pm
import pytest

import distvi as dv
import distvi.inference
import distvi.programs
import distvi.model
import distvi.worker
from distvi.data import DataError
from distvi.model import ModelError, ModelFactoryError


def _tripwire(*args, **kwargs):
    raise AssertionError("work started before the bad input was reported")


@pytest.fixture
def no_work(monkeypatch):
    monkeypatch.setattr(distvi.programs, "compile_program", _tripwire)
    monkeypatch.setattr(distvi.programs, "compile_block", _tripwire)
    monkeypatch.setattr(distvi.worker, "ShardWorker", _tripwire)
    monkeypatch.setattr(distvi.model.ModelAdapter, "compile_data_term", _tripwire)


class Spy:
    """A model factory that counts its calls."""

    def __init__(self, factory):
        self.factory, self.calls = factory, 0

    def __call__(self, data):
        self.calls += 1
        return self.factory(data)


@pytest.fixture
def spy(linreg):
    return Spy(linreg.factory)


def fit(model, data, n=10, **kwargs):
    kwargs.setdefault("backend", "local")
    return dv.fit(n, model=model, data=data, random_seed=0, progressbar=False, **kwargs)


# ------------------------------------------------------------------ method
def test_unknown_method_lists_valid_ones(no_work, spy, linreg):
    with pytest.raises(KeyError, match=r"'nuts'.*\['advi', 'asvgd', 'fullrank_advi', 'svgd'\]"):
        fit(spy, linreg.data, method="nuts")
    assert spy.calls == 0


def test_method_of_wrong_type(no_work, spy, linreg):
    with pytest.raises(TypeError, match="method must be a str or an Inference.*int"):
        fit(spy, linreg.data, method=3)
    assert spy.calls == 0


# ------------------------------------------------------------------ data
def test_data_arrays_with_different_row_counts(no_work, spy, linreg):
    with pytest.raises(DataError, match=r"different row counts.*'X': 400.*'y': 399"):
        fit(spy, {"X": linreg.X, "y": linreg.y[:-1]})
    assert spy.calls == 0


def test_empty_data_dict(no_work, spy):
    with pytest.raises(DataError, match="data is empty"):
        fit(spy, {})
    assert spy.calls == 0


def test_data_with_zero_rows(no_work, spy, linreg):
    with pytest.raises(DataError, match="no rows"):
        fit(spy, {"X": linreg.X[:0], "y": linreg.y[:0]})
    assert spy.calls == 0


def test_nan_in_data_names_array_and_first_bad_row(no_work, spy, linreg):
    X = linreg.X.copy()
    X[20, 0] = np.nan
    X[7, 1] = np.nan
    with pytest.raises(DataError, match=r"'X' has NaN or inf at row 7\b"):
        fit(spy, {"X": X, "y": linreg.y})
    assert spy.calls == 0


def test_inf_in_data_names_array_and_row(no_work, spy, linreg):
    y = linreg.y.copy()
    y[[3, 9]] = [-np.inf, np.inf]
    with pytest.raises(DataError, match=r"'y' has NaN or inf at row 3\b"):
        fit(spy, {"X": linreg.X, "y": y})
    assert spy.calls == 0


@pytest.mark.parametrize("dtype", [str, object])
def test_non_numeric_data(no_work, spy, linreg, dtype):
    with pytest.raises(DataError, match="'y' has non-numeric dtype"):
        fit(spy, {"X": linreg.X, "y": linreg.y.astype(dtype)})
    assert spy.calls == 0


# ------------------------------------------------------------------ sizes and counts
@pytest.mark.parametrize("batch_size", [0, -5])
def test_batch_size_not_positive(no_work, spy, linreg, batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {batch_size}"):
        fit(spy, linreg.data, batch_size=batch_size)
    assert spy.calls == 0


@pytest.mark.parametrize("batch_size", [2.5, 10.0, "10", True])
def test_batch_size_not_int(no_work, spy, linreg, batch_size):
    with pytest.raises(TypeError, match="batch_size must be an int"):
        fit(spy, linreg.data, batch_size=batch_size)
    assert spy.calls == 0


def test_num_workers_zero(no_work, spy, linreg):
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        fit(spy, linreg.data, num_workers=0)
    assert spy.calls == 0


def test_num_workers_more_than_rows(no_work, linreg):
    with pytest.raises(ValueError, match="num_workers=401 is more than the 400 rows"):
        fit(linreg.factory, linreg.data, num_workers=401)


def test_negative_n(no_work, spy, linreg):
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        fit(spy, linreg.data, n=-1)
    assert spy.calls == 0


@pytest.mark.parametrize("n", [10.0, "10", "forever"])  # None and "auto": until converged
def test_n_not_int(no_work, spy, linreg, n):
    with pytest.raises(TypeError, match="n must be an int"):
        fit(spy, linreg.data, n=n)
    assert spy.calls == 0


# ------------------------------------------------------------------ the model
def broken_factory(data):
    raise ValueError("column 'z' is missing")


def test_factory_that_raises(no_work, linreg):
    with pytest.raises(ModelFactoryError, match=r"'broken_factory' raised ValueError: column 'z' is missing") as info:
        fit(broken_factory, linreg.data)
    assert isinstance(info.value.__cause__, ValueError)


def not_a_model_factory(data):
    return {"X": data["X"]}


def test_factory_returning_non_model(no_work, linreg):
    with pytest.raises(TypeError, match="'not_a_model_factory' must return a pymc.Model, got dict"):
        fit(not_a_model_factory, linreg.data)


def discrete_factory(data):
    with pm.Model() as m:
        k = pm.Poisson("k", 3.0)
        pm.Normal("y", k, 1.0, observed=data["y"])
    return m


def test_discrete_free_variable(no_work, linreg):
    with pytest.raises(ModelError, match="free variable 'k' is discrete"):
        fit(discrete_factory, linreg.data)


def data_prior_factory(data):
    with pm.Model() as m:  # a prior read from the rows, on a variable not sized by them
        z = pm.Normal("z", data["y"].sum(), 1.0)
        pm.Normal("y", z, 1.0, observed=data["y"])
    return m


def test_free_variable_whose_prior_reads_the_rows(no_work, linreg):
    # (a variable whose first axis is the rows is a per-row local variable: test_local_vars)
    with pytest.raises(ModelError, match="free variable 'z' has a size or parameters that depend on the data rows"):
        fit(data_prior_factory, linreg.data)


def test_ready_model_with_data(no_work, linreg):
    model = linreg.factory(linreg.data)
    with pytest.raises(TypeError, match="data= goes with a model factory"):
        fit(model, linreg.data)


def test_no_model_outside_a_model_context(no_work, linreg):
    with pytest.raises(TypeError, match="no model given"):
        fit(None, linreg.data)


# ------------------------------------------------------------------ fit options
def test_unknown_optimizer_keyword():
    with pytest.raises(TypeError, match="adam.*unexpected keyword argument 'learning_rat'"):
        dv.adam(learning_rat=0.1)


def test_unknown_fit_keyword(no_work, linreg):
    with pytest.raises(TypeError, match="unexpected keyword argument 'obj_n_mcc'"):
        fit(linreg.factory, linreg.data, obj_n_mcc=2)


def test_pymc_fit_keyword_distvi_does_not_support(no_work, linreg):
    with pytest.raises(TypeError, match="'more_updates' is not supported"):
        fit(linreg.factory, linreg.data, more_updates={})


def test_obj_n_mc_zero(no_work, linreg):
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=0)
    with pytest.raises(ValueError, match="obj_n_mc must be >= 1, got 0"):
        inference.fit(10, obj_n_mc=0, progressbar=False)
    assert inference.hist.size == 0 and inference.state is None


@pytest.mark.parametrize("value", [0, -1.0, np.nan])
def test_total_grad_norm_constraint_not_positive(no_work, linreg, value):
    with pytest.raises(ValueError, match="total_grad_norm_constraint must be > 0"):
        fit(linreg.factory, linreg.data, total_grad_norm_constraint=value)


def test_unknown_backend(no_work, spy, linreg):
    with pytest.raises(ValueError, match=r"unknown backend 'spark'.*'local'"):
        fit(spy, linreg.data, backend="spark")
    assert spy.calls == 0


@pytest.mark.parametrize("beta", [0.0, -1.0, np.nan, np.inf])
def test_beta_not_positive_finite(no_work, linreg, beta):
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", beta=beta)


def test_refine_before_fit(no_work, linreg):
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=0)
    with pytest.raises(RuntimeError, match=r"call fit\(\) first"):
        inference.refine(10, progressbar=False)
    assert inference.hist.size == 0


# ------------------------------------------------------------------ groups
def test_unknown_vfam():
    with pytest.raises(KeyError, match="unknown vfam 'flow'.*'full_rank'.*'mean_field'"):
        dv.Group(None, vfam="flow")


def test_two_groups_claim_one_variable(no_work, logistic_data):
    from conftest import logistic_factory

    approx = dv.Approximation([dv.Group(["w"]), dv.Group(["b", "w"], vfam="full_rank"), dv.Group(None)])
    with pytest.raises(ValueError, match="variable 'w' is in more than one group"):
        dv.KLqp(approx, model=logistic_factory, data=logistic_data, backend="local")


@pytest.mark.parametrize("vfam, params", [
    ("mean_field", {"mu": np.zeros(3), "rho": np.zeros(2)}),
    ("full_rank", {"mu": np.zeros(4), "L_tril": np.zeros(6)}),
    ("full_rank", {"mu": np.zeros(3), "L_tril": np.zeros(4)}),
])
def test_group_params_of_wrong_size(no_work, linreg, vfam, params):
    # linreg has 3 free coordinates: mu needs 3 values, rho 3, L_tril 3 * 4 / 2 = 6
    approx = dv.Approximation([dv.Group(None, vfam=vfam, params=params)])
    with pytest.raises(ValueError, match="wrong size"):
        dv.KLqp(approx, model=linreg.factory, data=linreg.data, backend="local")


def test_klqp_over_empirical_group(no_work, linreg):
    draws = np.random.default_rng(0).normal(linreg.mean, 0.05, size=(50, 3))
    empirical = dv.Empirical({"w": draws}, model=linreg.factory, data=linreg.data)
    with pytest.raises(TypeError, match="KLqp cannot fit an Empirical group"):
        dv.KLqp(empirical, model=linreg.factory, data=linreg.data, backend="local")


# ------------------------------------------------------------------ NaN during the fit
def test_nan_during_fit_names_step_and_keeps_last_finite_state(linreg):
    # sgd at 0.01 on 400 rows overshoots (step * curvature ~ 4 > 2): the parameters grow
    # geometrically until the loss overflows, after 10 finite steps with this seed.
    inference = dv.ADVI(model=linreg.factory, data=linreg.data, backend="local", random_seed=0)
    approx = inference.approx
    tracker = dv.Tracker(mean=lambda: approx.mean.copy())
    with pytest.raises(FloatingPointError, match=r"NaN or inf at step \d+.*'w'") as info:
        inference.fit(300, obj_optimizer=dv.sgd(learning_rate=0.01), callbacks=[tracker], progressbar=False)
    failed_step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert 0 < len(inference.hist) == failed_step < 300  # 0-based index of the failing step
    assert np.all(np.isfinite(inference.hist))
    assert np.all(np.isfinite(approx.mean)) and np.all(np.isfinite(approx.std))
    np.testing.assert_array_equal(approx.mean, tracker["mean"][-1])


@pytest.mark.parametrize("options, error, match", [
    ({"num_cpu": 1}, TypeError, "unknown backend_options"),
    ({"num_cpus": 0}, ValueError, "num_cpus"),
    ({"max_restarts": -1}, ValueError, "max_restarts"),
    ({"path": "fast"}, ValueError, "path"),
])
def test_bad_backend_options_are_refused_at_construction(linreg, options, error, match):
    with pytest.raises(error, match=match):
        dv.ADVI(model=linreg.factory, data=linreg.data, backend="ray", num_workers=2,
                backend_options=options)
