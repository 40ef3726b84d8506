"""Did it work? PSIS k-hat over the full data, importance resampling, iterate averaging and
the loss-convergence stop, against closed-form posteriors."""

import numpy as np
import pytest
from scipy import stats

import distvi as dv
from distvi.families import softplus_inv
from distvi.optimizers import GeometricDecay

from conftest import LinearRegression


@pytest.fixture(scope="module")
def corr():
    """A strongly correlated Gaussian posterior: 8 columns with pairwise correlation ~0.9
    (mean-field q of it has k-hat >= 1 for every seed tried)."""
    lr = LinearRegression(n_rows=2000, n_coef=8, seed=11)
    rng = np.random.default_rng(12)
    base = rng.normal(size=(2000, 1))
    X = 0.95 * base + np.sqrt(1 - 0.95**2) * rng.normal(size=(2000, 8))
    lr.X = X
    lr.y = X @ np.linspace(1.0, -1.0, 8) + rng.normal(size=2000)
    lr.data = {"X": X, "y": lr.y}
    lr.cov = np.linalg.inv(np.eye(8) + X.T @ X)
    lr.mean = lr.cov @ X.T @ lr.y
    return lr


def exact_log_posterior(lr, points):
    """log p(w | y) up to a constant, in numpy."""
    prior = stats.multivariate_normal(np.zeros(lr.X.shape[1]), np.eye(lr.X.shape[1]) / lr.tau)
    resid = lr.y[None, :] - points @ lr.X.T
    return prior.logpdf(points) - 0.5 * np.sum(resid**2, axis=1) / lr.sigma**2


def set_full_rank(approx, mean, cov):
    L = np.linalg.cholesky(cov)
    d = len(mean)
    packed = L[np.tril_indices(d)].copy()
    rows, cols = np.tril_indices(d)
    packed[rows == cols] = softplus_inv(packed[rows == cols])
    approx.params_values = [np.array(mean, dtype=float), packed]


def set_mean_field(approx, mean, sd):
    approx.params_values = [np.array(mean, dtype=float), softplus_inv(np.asarray(sd, dtype=float))]


def test_log_ratios_are_the_exact_log_posterior_minus_log_q(corr):
    inf = dv.FullRankADVI(model=corr.factory, data=corr.data, random_seed=1)
    set_full_rank(inf.approx, corr.mean + 0.01, corr.cov * 1.3)
    d = inf.approx.diagnose(200, random_seed=4)
    q = stats.multivariate_normal(corr.mean + 0.01, corr.cov * 1.3)
    expected = exact_log_posterior(corr, d.points) - q.logpdf(d.points)
    # equal up to the normalizing constant of the posterior
    np.testing.assert_allclose(d.log_ratios - d.log_ratios.mean(), expected - expected.mean(),
                               atol=1e-7)


def test_q_equal_to_the_posterior_gives_a_small_khat(corr):
    inf = dv.FullRankADVI(model=corr.factory, data=corr.data, random_seed=1)
    set_full_rank(inf.approx, corr.mean, corr.cov)
    d = inf.approx.diagnose(1000, random_seed=2)
    assert d.khat < 0.5 and d.verdict == "good"
    assert d.ess > 990  # the weights are all equal
    np.testing.assert_allclose(np.ptp(d.log_ratios), 0.0, atol=1e-6)


def test_fitted_full_rank_is_good_and_mean_field_on_a_correlated_posterior_is_not(corr):
    def schedule():
        return dv.adam(learning_rate=GeometricDecay(0.02, 0.002, 0, 8000))

    full = dv.FullRankADVI(model=corr.factory, data=corr.data, random_seed=1)
    full.fit(8000, obj_optimizer=schedule(), obj_n_mc=4, average_from=0.5, progressbar=False)
    good = full.approx.diagnose(1000, random_seed=2)
    assert good.khat < 0.5 and good.verdict == "good", good
    mf = dv.ADVI(model=corr.factory, data=corr.data, random_seed=1)
    mf.fit(8000, obj_optimizer=schedule(), obj_n_mc=4, average_from=0.5, progressbar=False)
    bad = mf.approx.diagnose(1000, random_seed=2)
    assert bad.khat > 0.7 and bad.verdict == "do not trust", bad
    with pytest.raises(ValueError, match=r"k-hat is .* \(> 0.7\).*FullRankADVI"):
        mf.approx.sample(200, psis=True, random_seed=3)


def test_psis_resampling_moves_a_biased_mean_field_q_toward_the_posterior(linreg):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=1)
    sd = np.sqrt(np.diag(linreg.cov))
    set_mean_field(inf.approx, linreg.mean + 0.7 * sd, 1.3 * sd)  # off by 0.7 sd, too wide
    raw = inf.approx.sample(2000, random_seed=5).posterior["w"].values.reshape(-1, 3)
    idata = inf.approx.sample(2000, psis=True, psis_draws=4000, random_seed=5)
    fixed = idata.posterior["w"].values.reshape(-1, 3)
    raw_err = np.abs(raw.mean(0) - linreg.mean) / sd
    psis_err = np.abs(fixed.mean(0) - linreg.mean) / sd
    assert np.all(raw_err > 0.5) and np.all(psis_err < 0.15), (raw_err, psis_err)
    attrs = idata.sample_stats.attrs
    assert attrs["psis_khat"] <= 0.7 and attrs["psis_verdict"] in ("good", "usable")
    w = idata.sample_stats["psis_weight"].values
    assert w.shape == (1, 2000) and np.all(w > 0)


def test_sharded_full_data_evaluation_equals_one_shard(corr):
    points = np.random.default_rng(0).normal(size=(50, 8))
    one = dv.ADVI(model=corr.factory, data=corr.data, random_seed=1)
    three = dv.ADVI(model=corr.factory, data=corr.data, random_seed=1, num_workers=3,
                    batch_size=64, backend="local")
    a, b = one.full_data_logp(points), three.full_data_logp(points)
    np.testing.assert_allclose(b, a, rtol=1e-10)
    expected = -0.5 * np.sum((corr.y[None] - points @ corr.X.T) ** 2, axis=1) \
        - 0.5 * len(corr.y) * np.log(2 * np.pi)
    np.testing.assert_allclose(a, expected, rtol=1e-10)


@pytest.mark.usefixtures("ray_cluster")
def test_sharded_full_data_evaluation_on_ray_equals_local(corr):
    points = np.random.default_rng(0).normal(size=(50, 8))
    local = dv.ADVI(model=corr.factory, data=corr.data, random_seed=1).full_data_logp(points)
    with dv.ADVI(model=corr.factory, data=corr.data, random_seed=1, num_workers=2,
                 batch_size=64, backend="ray") as inf:
        np.testing.assert_allclose(inf.full_data_logp(points), local, rtol=1e-10)


def test_diagnose_refuses_bad_input(linreg):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=1)
    with pytest.raises(ValueError, match="draws must be >= 100"):
        inf.approx.diagnose(10)
    with pytest.raises(TypeError, match="draws must be an int"):
        inf.approx.diagnose(1000.0)
    svgd = dv.SVGD(n_particles=10, model=linreg.factory, data=linreg.data, random_seed=1)
    with pytest.raises(TypeError, match="Empirical approximation"):
        svgd.approx.diagnose(200)
    with pytest.raises(TypeError, match="Empirical approximation"):
        svgd.approx.sample(100, psis=True)


# ------------------------------------------------------------------------- iterate averaging
@pytest.fixture(scope="module")
def big():
    return LinearRegression(n_rows=20000, n_coef=3, seed=21)


def averaged_fit(big, seed=2):
    # full-rank ADVI on minibatches of 500 with a constant adam(0.02): the last iterate's sds
    # wander (here up to 8x the exact ones), the mean of the second half does not
    inf = dv.FullRankADVI(model=big.factory, data=big.data, batch_size=500, random_seed=seed)
    inf.fit(20000, obj_optimizer=dv.adam(learning_rate=0.02), average_from=0.5, progressbar=False)
    return inf


def test_averaging_brings_minibatch_sds_to_the_exact_ones(big):
    exact_sd = np.sqrt(np.diag(big.cov))
    avg = averaged_fit(big)
    averaged = [np.array(p) for p in avg.approx.params_values]
    avg_err = np.max(np.abs(avg.approx.std / exact_sd - 1))
    assert np.all(np.abs(avg.approx.mean - big.mean) / exact_sd < 0.2)
    # the optimizer goes on from the last iterate; the approximation holds the average
    assert avg.state.n_averaged == 10000
    avg.approx.params_values = list(avg.state.params)
    last_err = np.max(np.abs(avg.approx.std / exact_sd - 1))
    assert last_err > 0.10 and avg_err < 0.10, (last_err, avg_err)
    again = averaged_fit(big)
    for a, b in zip(again.approx.params_values, averaged):
        np.testing.assert_array_equal(a, b)


def test_an_interrupted_averaged_fit_resumes_exactly(linreg, tmp_path):
    def make():
        return dv.FullRankADVI(model=linreg.factory, data=linreg.data, batch_size=50, random_seed=3)

    full = make()
    full.fit(400, obj_optimizer=dv.adam(learning_rate=0.02), average_from=0.5, progressbar=False)

    def stop_at_250(approx, losses, i):
        if i == 250:
            raise StopIteration

    stop_at_250.call_every = 1  # every step, through fused blocks as the fit compared runs
    store = tmp_path / "run.zarr"
    make().fit(400, obj_optimizer=dv.adam(learning_rate=0.02), average_from=0.5, progressbar=False,
               store=store, checkpoint_every=100, callbacks=[stop_at_250])
    run = dv.open_run(store)
    assert run.status == "stopped" and run.checkpoint.step == 250
    assert run.checkpoint.n_averaged == 50
    resumed = make()
    resumed.fit(400, obj_optimizer=dv.adam(learning_rate=0.02), average_from=0.5,
                progressbar=False, store=store, resume=True)
    for a, b in zip(resumed.approx.params_values, full.approx.params_values):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(resumed.hist, full.hist)
    with pytest.raises(Exception, match="average_from"):
        make().fit(400, obj_optimizer=dv.adam(learning_rate=0.02), average_from=0.25,
                   progressbar=False, store=store, resume=True)


@pytest.mark.parametrize("value, error", [(1.0, ValueError), (-0.1, ValueError), (400, ValueError),
                                          (True, TypeError), ("half", TypeError)])
def test_bad_average_from_is_refused_before_any_step(linreg, value, error):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=1)
    with pytest.raises(error, match="average_from"):
        inf.fit(400, average_from=value, progressbar=False)
    assert inf.state is None or inf.state.step == 0


# ------------------------------------------------------------------------- loss convergence
def test_loss_convergence_stops_a_converged_fit_early(linreg):
    stop = dv.CheckLossConvergence(window=200, tolerance=1e-3)
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=1)
    inf.fit(20000, obj_optimizer=dv.adam(learning_rate=0.05), callbacks=[stop], progressbar=False)
    assert stop.stopped_at is not None and 400 <= stop.stopped_at < 20000
    assert inf.state.step == stop.stopped_at == len(inf.hist)
    # stopped where the running means agree within the tolerance, not before
    last, before = inf.hist[-200:].mean(), inf.hist[-400:-200].mean()
    assert abs(last - before) / abs(before) < 1e-3
    assert all(change >= 1e-3 for _, change in stop.changes[:-1])


def test_loss_convergence_leaves_a_falling_or_diverging_loss_alone():
    stop = dv.CheckLossConvergence(window=100, tolerance=1e-3, every=1)
    steps = np.arange(1, 2001)
    for losses in (1e4 / steps, 100.0 * 1.01 ** steps):  # still falling; growing
        for i in range(200, 2001):
            stop(None, losses[:i], i)
    assert stop.stopped_at is None and len(stop.changes) > 0


def test_loss_convergence_needs_a_loss_and_valid_settings(linreg):
    with pytest.raises(ValueError, match="window"):
        dv.CheckLossConvergence(window=0)
    with pytest.raises(ValueError, match="tolerance"):
        dv.CheckLossConvergence(tolerance=0)
    stop = dv.CheckLossConvergence(window=5)
    inf = dv.SVGD(n_particles=5, model=linreg.factory, data=linreg.data, random_seed=1)
    with pytest.raises(ValueError, match="needs the loss"):
        inf.fit(50, callbacks=[stop], progressbar=False)


def test_non_finite_log_ratios_are_reported_not_fitted(linreg, monkeypatch):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=1)
    real = inf.approx.shard_data.logp

    def with_a_nan(points):  # a data term that is NaN at one draw
        out = real(points)
        out[3] = np.nan
        return out

    monkeypatch.setattr(inf.approx.shard_data, "logp", with_a_nan)
    with pytest.raises(FloatingPointError, match="1 of 200 log importance ratios are NaN"):
        inf.approx.diagnose(200, random_seed=1)


# ------------------------------------------------------------------------- advice
@pytest.fixture(scope="module")
def collinear():
    """Linear regression on three scalar coefficients: a and b on two nearly collinear
    predictors (posterior correlation about -0.99), c on an independent one."""
    import pymc as pm

    rng = np.random.default_rng(5)
    z = rng.normal(size=500)
    x = {"x1": z, "x2": 0.995 * z + np.sqrt(1 - 0.995**2) * rng.normal(size=500),
         "x3": rng.normal(size=500)}
    y = x["x1"] - 0.5 * x["x2"] + 0.3 * x["x3"] + rng.normal(size=500)

    def factory(d):
        with pm.Model() as m:
            a, b, c = (pm.Normal(name, 0.0, 1.0) for name in "abc")
            pm.Normal("y", a * d["x1"] + b * d["x2"] + c * d["x3"], 1.0, observed=d["y"])
        return m

    X = np.column_stack([x["x1"], x["x2"], x["x3"]])
    cov = np.linalg.inv(np.eye(3) + X.T @ X)
    return factory, {**x, "y": y}, cov @ X.T @ y, cov


def fitted(cls, collinear):
    factory, data, _, _ = collinear
    inf = cls(model=factory, data=data, random_seed=1)
    inf.fit(2000, obj_optimizer=dv.adam(learning_rate=GeometricDecay(0.05, 0.002, 0, 2000)),
            obj_n_mc=2, average_from=0.5, progressbar=False)
    return inf


def test_mean_field_on_collinear_coefficients_is_told_which_to_group(collinear):
    inf = fitted(dv.ADVI, collinear)
    d = inf.approx.diagnose(10_000, random_seed=0)  # 10,000 draws: k-hat > 0.75 for every seed tried
    assert d.khat > 0.7 and d.verdict == "do not trust", d
    (a, b, r), *rest = d.correlated
    assert (a, b) == ("a", "b") and r > 0.5 and all(r2 <= r for *_, r2 in rest)
    assert "FullRankADVI" in d.advice and "Group(['a', 'b'], vfam='full_rank')" in d.advice
    assert "'c'" not in d.advice
    used = inf.approx.fit_info["gradient_evaluations"]
    assert used == inf.gradient_evaluations == 2000 * 2
    assert d.gradient_evaluations == used and d.as_dict()["gradient_evaluations"] == used
    assert f"the fit used {used} gradient evaluations" in str(d)
    assert f"advice: {d.advice}" in str(d) and d.as_dict()["advice"] == d.advice
    assert d.as_dict()["correlated"][0][:2] == ["a", "b"]


def test_full_rank_on_collinear_coefficients_needs_nothing_and_a_poor_one_more_steps(collinear):
    _, _, mean, cov = collinear
    inf = fitted(dv.FullRankADVI, collinear)
    d = inf.approx.diagnose(2000, random_seed=0)
    assert d.khat < 0.5 and d.advice == "no action needed", d
    assert d.gradient_evaluations == inf.approx.fit_info["gradient_evaluations"] == 4000
    assert d.correlated == []  # pairs the full-rank group holds already are not named
    set_full_rank(inf.approx, mean, cov * 0.03)  # q far too narrow, all its correlations right
    poor = inf.approx.diagnose(10_000, random_seed=0)  # k-hat > 0.94 for every seed tried
    assert poor.khat > 0.7 and "more steps or n=None" in poor.advice, poor
    assert "FullRankADVI" not in poor.advice and "Group(" not in poor.advice


def test_advice_for_each_reading_of_khat(linreg):
    from distvi.diagnostics import advise

    mf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=1).approx
    fr = dv.FullRankADVI(model=linreg.factory, data=linreg.data, random_seed=1).approx
    assert advise(mf, 0.3, [], {}) == advise(fr, 0.3, [], {}) == "no action needed"
    assert "usable" in advise(mf, 0.6, [], {}) and "FullRankADVI" in advise(mf, 0.6, [], {})
    assert "usable" in advise(fr, 0.6, [], {}) and "FullRankADVI" not in advise(fr, 0.6, [], {})
    assert "skewed or heavy-tailed" in advise(mf, float("inf"), [], {})
    assert "w's elements: 0.80" in advise(mf, 0.9, [("w", "w", 0.8)], {})
    assert "more steps or n=None" in advise(fr, 0.9, [], {"converged": None})
    assert "reparameterise" in advise(fr, 0.9, [], {"converged": True})
    assert "no correlations were estimated" in advise(mf, 0.9, None, {})
    # no fit yet: no count of gradient evaluations
    assert dv.ADVI(model=linreg.factory, data=linreg.data).approx.diagnose(200).gradient_evaluations is None
