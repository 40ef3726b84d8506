"""Fits run until they converge (``fit(n=None)``) and the start near the answer
(``start="map"``), against closed-form posteriors."""

from __future__ import annotations


import numpy as np
import pymc as pm
import pytest

import distvi as dv
from distvi import convergence
from distvi.convergence import own_error
from distvi.errors import ConvergenceWarning, StartWarning

ROWS, K, NOISE, PRIOR_SD = 20_000, 6, 2.0, 10.0


def regression(rows: int = ROWS, seed: int = 0):
    """Rows with correlated columns (0.8^|i-j|), known noise: the posterior is Gaussian,
    known in closed form."""
    rng = np.random.default_rng(seed)
    C = 0.8 ** np.abs(np.subtract.outer(np.arange(K), np.arange(K)))
    X = rng.multivariate_normal(np.zeros(K), C, size=rows)
    y = X @ rng.normal(size=K) + NOISE * rng.normal(size=rows)
    precision = X.T @ X / NOISE**2 + np.eye(K) / PRIOR_SD**2
    cov = np.linalg.inv(precision)
    return {"X": X, "y": y}, cov @ (X.T @ y) / NOISE**2, cov, precision


def factory(d):
    with pm.Model() as m:
        b = pm.Normal("b", 0, PRIOR_SD, shape=K)
        pm.Normal("y", pm.math.dot(d["X"], b), NOISE, observed=d["y"])
    return m


@pytest.fixture(scope="module")
def problem():
    return regression()


def errors(approx, mean, sd):
    m, s = np.asarray(approx.mean), np.asarray(approx.std)
    return np.max(np.abs(m - mean) / sd), np.max(np.abs(s / sd - 1))


def test_fullrank_n_none_reaches_the_closed_form_with_defaults(problem):
    data, mean, cov, _ = problem
    inf = dv.FullRankADVI(model=factory, data=data, random_seed=1)
    approx = inf.fit(None, progressbar=False)
    mean_err, sd_err = errors(approx, mean, np.sqrt(np.diag(cov)))
    assert mean_err < 0.1 and sd_err < 0.03, (mean_err, sd_err)
    conv = inf.convergence
    assert inf.converged and conv.reason == "converged" and conv.step == inf.state.step
    assert conv.phases[-1].change < conv.tol and len(conv.phases) >= 2
    assert [p.learning_rate for p in conv.phases] == [0.1 * 0.5**i for i in range(len(conv.phases))]
    assert inf.start_report.method == "map" and inf.start_report.gradient_evaluations > 0
    # every point the gradient was taken at: the L-BFGS path, then each phase's draws a step
    steps = sum((p.end_step - p.start_step) * p.draws for p in conv.phases)
    assert inf.gradient_evaluations == inf.start_report.gradient_evaluations + steps
    assert approx.fit_info["gradient_evaluations"] == inf.gradient_evaluations
    # q's draws a step start at obj_n_mc and at most double from a phase to the next
    draws = [p.draws for p in conv.phases]
    assert draws[0] == 1 and all(b in (a, 2 * a) for a, b in zip(draws, draws[1:]))
    assert max(draws) <= convergence.MAX_DRAWS and inf.fit_config(1, None)["obj_n_mc"] == 1
    assert approx.fit_info["converged"] is True
    # the covariance too, not only the marginals
    np.testing.assert_allclose(np.asarray(approx.cov), cov, atol=0.03 * np.max(np.diag(cov)))


def test_the_map_start_is_the_pathfinder_gaussian(problem):
    """On a Gaussian posterior the L-BFGS path's quasi-Newton Gaussian is the posterior: the
    full-rank start is its covariance, the mean-field start its precision's diagonal (the
    mean-field optimum)."""
    data, mean, cov, precision = problem
    fr = dv.FullRankADVI(model=factory, data=data, random_seed=1, start="map")
    approx = fr.fit(0, progressbar=False)
    sd = np.sqrt(np.diag(cov))
    assert fr.start_report.method == "map" and fr.start_report.iterations >= 2
    mean_err, sd_err = errors(approx, mean, sd)
    assert mean_err < 0.05 and sd_err < 0.05, (mean_err, sd_err)
    mf = dv.ADVI(model=factory, data=data, random_seed=1, start="map")
    approx = mf.fit(0, progressbar=False)
    mf_sd = 1 / np.sqrt(np.diag(precision))
    np.testing.assert_allclose(np.asarray(approx.std), mf_sd, rtol=0.05)
    assert np.max(np.abs(np.asarray(approx.mean) - mean) / sd) < 0.05


def test_meanfield_minibatches_reach_the_meanfield_optimum(problem):
    """Minibatches of 512 of 20,000 rows: the control variate anchored at each phase's start
    takes the minibatch noise out, and successive phases agree within 0.02."""
    data, mean, cov, precision = problem
    inf = dv.ADVI(model=factory, data=data, random_seed=1, batch_size=512)
    approx = inf.fit(None, progressbar=False)
    mf_sd = 1 / np.sqrt(np.diag(precision))
    sd_err = np.max(np.abs(np.asarray(approx.std) / mf_sd - 1))
    assert sd_err < 0.05, sd_err
    assert np.max(np.abs(np.asarray(approx.mean) - mean) / np.sqrt(np.diag(cov))) < 0.1
    conv = inf.convergence
    assert inf.converged and conv.reason == "converged"
    # a step takes the gradient at q's draws and at the anchor; a phase's anchor once more
    # on the full data
    steps = sum((p.end_step - p.start_step) * (p.draws + 1) for p in conv.phases)
    assert conv.gradient_evaluations == steps + len(conv.phases)
    assert inf.gradient_evaluations == inf.start_report.gradient_evaluations + steps


def test_the_control_variate_keeps_the_answer_and_removes_the_noise(problem):
    """The anchored estimate has the plain one's expectation and far less spread."""
    from distvi.backends.anchored import AnchoredBackend

    data, *_ = problem
    inf = dv.ADVI(model=factory, data=data, random_seed=1, batch_size=512)
    inf.fit(0, progressbar=False)
    backend = inf.shards.start()
    z = np.asarray(inf.approx.mean)[None, :] + 0.01
    anchor = z[0] + 0.001
    logp, grad = inf.shards.logp_and_grad(anchor[None, :])
    anchored = AnchoredBackend(backend, anchor, logp[0], grad[0])
    exact = inf.shards.logp_and_grad(z)[1][0]
    plain = np.array([backend.evaluate(z, t)[1][0] for t in range(200)])
    cv = np.array([anchored.evaluate(z, t)[1][0] for t in range(200)])
    assert np.all(cv.std(axis=0) < 1e-2 * plain.std(axis=0))
    np.testing.assert_allclose(cv.mean(axis=0), exact,
                               atol=4 * cv.std(axis=0).max() / np.sqrt(200) + 1e-9 * np.abs(exact).max())
    np.testing.assert_allclose(plain.mean(axis=0), exact, atol=4 * plain.std(axis=0).max() / np.sqrt(200))
    inf.close()


def test_the_same_seed_gives_the_same_fit_and_the_cap_is_named(problem):
    data, *_ = problem
    runs = []
    for _ in range(2):
        inf = dv.FullRankADVI(model=factory, data=data, random_seed=3)
        with pytest.warns(ConvergenceWarning, match="max_n=400"):
            inf.fit(None, max_n=400, progressbar=False)
        assert inf.converged is False and inf.convergence.reason == "max_n"
        assert inf.state.step == 400
        runs.append([np.array(p) for p in inf.approx.params_values])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_diverging_rate_backs_off_and_still_converges(problem):
    data, mean, cov, _ = problem
    inf = dv.FullRankADVI(model=factory, data=data, random_seed=1)
    approx = inf.fit(None, obj_optimizer=dv.adam(learning_rate=5.0), progressbar=False)
    conv = inf.convergence
    assert conv.backoffs >= 1
    assert conv.phases[0].outcome in ("diverged", "not finite")  # settled far above the start
    assert conv.phases[1].learning_rate == pytest.approx(5.0 * 0.25)
    assert inf.converged
    mean_err, sd_err = errors(approx, mean, np.sqrt(np.diag(cov)))
    assert mean_err < 0.1 and sd_err < 0.03


def test_fixed_n_keeps_the_plain_estimator_and_no_convergence(problem):
    data, *_ = problem
    inf = dv.FullRankADVI(model=factory, data=data, random_seed=1)
    inf.fit(20, progressbar=False)
    assert inf.objective.stl is False and inf.converged is None and inf.start_report is None
    explicit = dv.FullRankADVI(model=factory, data=data, random_seed=1, stl=False)
    with pytest.warns(ConvergenceWarning):
        explicit.fit(None, max_n=200, progressbar=False)
    assert explicit.objective.stl is False


def test_a_map_start_without_progress_warns_and_keeps_the_start():
    with pm.Model():
        pm.Normal("x", 0.0, 1.0)  # starts at its mode: the gradient is 0, L-BFGS stops there
        with pytest.warns(StartWarning, match="start='map' failed"):
            inf = dv.ADVI(random_seed=0, start="map")
            approx = inf.fit(0, progressbar=False)
    assert inf.start_report.method == "default"
    np.testing.assert_array_equal(approx.params_values[0], [0.0])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n": 100, "max_n": 10}, TypeError, "max_n= and tol= apply"),
    ({"n": 100, "tol": 0.1}, TypeError, "max_n= and tol= apply"),
    ({"n": None, "tol": 0.0}, ValueError, "tol must be a number in"),
    ({"n": None, "tol": "x"}, ValueError, "tol must be a number in"),
    ({"n": None, "max_n": 0}, ValueError, "max_n must be >= 1"),
    ({"n": None, "max_n": 1.5}, TypeError, "max_n must be an int"),
    ({"n": None, "average_from": 0.5}, ValueError, "average_from is for a fixed n"),
    ({"n": None, "resume": True, "store": "unused.zarr"}, ValueError, "resume=True needs a fixed n"),
    ({"n": None, "obj_optimizer": dv.adam(learning_rate=lambda t: 0.1)}, ValueError,
     "a learning-rate schedule and n=None"),
    ({"n": "forever"}, TypeError, "n must be an int"),
])
def test_bad_settings_for_n_none_are_refused_before_any_work(problem, kwargs, error, match, tmp_path):
    data, *_ = problem
    inf = dv.FullRankADVI(model=factory, data=data, random_seed=1)
    if "store" in kwargs:
        kwargs["store"] = str(tmp_path / kwargs["store"])
    with pytest.raises(error, match=match):
        inf.fit(progressbar=False, **kwargs)
    assert inf.state is None and inf.start_report is None


def test_a_bad_start_string_is_refused():
    with pytest.raises(ValueError, match="start must be a dict of values or 'map'"):
        dv.ADVI(model=factory, data=regression(200)[0], start="mode")


def test_n_auto_recorded_in_the_store(problem, tmp_path):
    from distvi.store import RunStore

    data, *_ = problem
    store = str(tmp_path / "run.zarr")
    inf = dv.FullRankADVI(model=factory, data=data, random_seed=1)
    inf.fit("auto", progressbar=False, store=store)
    attrs = RunStore.open(store).attrs
    assert attrs["status"] == "finished"
    assert attrs["config"]["fit"]["n"] is None and attrs["config"]["fit"]["max_n"] == 100_000
    conv = attrs["convergence"]
    assert conv["converged"] is True and conv["reason"] == "converged"
    assert conv["step"] == inf.state.step and len(conv["phases"]) == len(inf.convergence.phases)
    assert attrs["start"]["method"] == "map"
    assert attrs["start"]["gradient_evaluations"] == inf.start_report.gradient_evaluations


def test_distvi_fit_runs_until_converged_and_resume_needs_an_n(problem, tmp_path):
    from distvi.store import StoreError

    data, mean, cov, _ = problem
    store = str(tmp_path / "run.zarr")
    approx = dv.fit(None, method="fullrank_advi", model=factory, data=data, random_seed=1,
                    progressbar=False, store=store)
    assert approx.fit_info["converged"] is True
    mean_err, sd_err = errors(approx, mean, np.sqrt(np.diag(cov)))
    assert mean_err < 0.1 and sd_err < 0.03
    with pytest.raises(StoreError, match="was a fit run until converged"):
        dv.resume(store, model=factory, data=data, progressbar=False)


def test_own_error_is_the_largest_relative_monte_carlo_error():
    m, sd = np.array([0.0, 5.0]), np.array([2.0, 0.5])
    se_m, se_s = np.array([0.02, 0.001]), np.array([0.01, 0.02])
    # means' errors in sds (0.01, 0.002), sds' relative (0.005, 0.04)
    assert own_error((m, sd, se_m, se_s)) == pytest.approx(0.04)
    assert own_error((np.zeros(0),) * 4) == 0.0

