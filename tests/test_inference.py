"""Fits against closed-form posteriors, and the compositions that must hold exactly."""

import numpy as np
import pymc as pm
import pytest

import distvi as dv

from conftest import LinearRegression


def schedule(total, flat_share=0.4, lr0=0.05, end=1e-4):
    """Constant, then geometric decay to ``end`` at ``total``: adam's last iterate then sits
    within a small fraction of a posterior sd of the optimum."""
    flat = int(total * flat_share)

    def lr(step):
        frac = min(max(step - flat, 0), total - flat) / (total - flat)
        return lr0 * (end / lr0) ** frac

    return lr


@pytest.fixture(scope="module")
def exact_fullrank(linreg):
    inf = dv.FullRankADVI(model=linreg.factory, data=linreg.data, random_seed=3, stl=True)
    inf.fit(4000, obj_optimizer=dv.adam(learning_rate=schedule(4000)), progressbar=False)
    return inf


def test_fullrank_recovers_closed_form_mean_and_cov(exact_fullrank, linreg):
    approx = exact_fullrank.approx
    sd = np.sqrt(np.diag(linreg.cov))
    np.testing.assert_allclose(approx.mean, linreg.mean, atol=0.02 * sd.min())
    np.testing.assert_allclose(approx.std, sd, rtol=0.04)
    np.testing.assert_allclose(approx.cov, linreg.cov, atol=0.08 * sd.min() ** 2)


def test_fullrank_optimum_elbo_is_log_evidence(exact_fullrank, linreg):
    # -loss at q = posterior equals the log evidence; the last losses are noisy estimates
    tail = -exact_fullrank.hist[-500:]
    assert abs(tail.mean() - linreg.log_evidence) < 1.0


def test_meanfield_recovers_exact_mean_and_marginal_precision():
    lr = LinearRegression(n_rows=300, n_coef=3, correlated=True, seed=2)
    approx = dv.fit(4000, method="advi", model=lr.factory, data=lr.data, random_seed=1,
                    inf_kwargs={"stl": True}, obj_n_mc=4,
                    obj_optimizer=dv.adam(learning_rate=schedule(4000)), progressbar=False)
    prec = np.linalg.inv(lr.cov)
    exact_sd = 1 / np.sqrt(np.diag(prec))
    np.testing.assert_allclose(approx.mean, lr.mean, atol=0.1 * exact_sd.min())
    np.testing.assert_allclose(approx.std, exact_sd, rtol=0.02)


def test_minibatches_scaled_land_on_full_data_posterior():
    lr = LinearRegression(n_rows=2000, n_coef=2, seed=4)
    approx = dv.fit(6000, method="fullrank_advi", model=lr.factory, data=lr.data, batch_size=100,
                    random_seed=2, obj_optimizer=dv.adam(learning_rate=schedule(6000, 0.33)),
                    progressbar=False)
    sd = np.sqrt(np.diag(lr.cov))
    # the last iterate of a minibatch fit keeps some noise: within 0.6 sd, sd within 40 %
    assert np.all(np.abs(approx.mean - lr.mean) < 0.6 * sd)
    assert np.all(np.abs(approx.std / sd - 1) < 0.4)
    # unscaled, the minibatch posterior would be sqrt(N/B) ~ 4.5 times wider
    unscaled_sd = sd * np.sqrt(2000 / 100)
    assert np.all(approx.std < 0.5 * unscaled_sd)


def test_minibatches_with_several_mc_points(linreg):
    approx = dv.fit(3000, model=linreg.factory, data=linreg.data, batch_size=50, obj_n_mc=3,
                    random_seed=5, obj_optimizer=dv.adam(learning_rate=schedule(3000)),
                    progressbar=False)
    sd = np.sqrt(np.diag(linreg.cov))
    assert np.all(np.abs(approx.mean - linreg.mean) < 0.5 * sd)


def _short_fit(linreg, **kw):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=kw.pop("seed", 11),
                  backend="local", **kw)
    inf.fit(200, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    return inf


def test_same_seed_same_numbers_other_seed_other_numbers(linreg):
    a, b = _short_fit(linreg, batch_size=40), _short_fit(linreg, batch_size=40)
    np.testing.assert_array_equal(a.hist, b.hist)
    np.testing.assert_array_equal(a.approx.mean, b.approx.mean)
    c = _short_fit(linreg, batch_size=40, seed=12)
    assert not np.allclose(a.hist, c.hist)


def test_full_batch_one_shard_equals_four_shards(linreg):
    one = _short_fit(linreg, num_workers=1)
    four = _short_fit(linreg, num_workers=4)
    np.testing.assert_allclose(one.hist, four.hist, rtol=1e-8)
    np.testing.assert_allclose(one.approx.mean, four.approx.mean, rtol=1e-8, atol=1e-10)


def test_refine_equals_one_longer_fit(linreg):
    opt = dv.adam(learning_rate=0.05)
    # 300 + 1000 crosses the blocks in which normals (256 steps) and minibatch offsets
    # (1024 steps) are drawn
    split = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=30, random_seed=4)
    split.fit(300, obj_optimizer=opt, progressbar=False)
    split.refine(1000, progressbar=False)
    whole = dv.ADVI(model=linreg.factory, data=linreg.data, batch_size=30, random_seed=4)
    whole.fit(1300, obj_optimizer=opt, progressbar=False)
    np.testing.assert_array_equal(split.hist, whole.hist)
    np.testing.assert_array_equal(split.approx.mean, whole.approx.mean)


def test_fit_again_keeps_parameters_with_a_fresh_optimizer(linreg):
    inf = _short_fit(linreg)
    before = inf.approx.mean.copy()
    inf.fit(50, obj_optimizer=dv.sgd(learning_rate=1e-9), progressbar=False)
    np.testing.assert_allclose(inf.approx.mean, before, atol=1e-4)  # continued, not restarted
    assert len(inf.hist) == 250 and inf.state.step == 250 and inf.state.opt_step == 50


def test_beta_tempers_the_posterior(linreg):
    beta = 2.0
    inf = dv.FullRankADVI(model=linreg.factory, data=linreg.data, random_seed=3, stl=True, beta=beta)
    inf.fit(4000, obj_optimizer=dv.adam(learning_rate=schedule(4000)), progressbar=False)
    X, y, s = linreg.X, linreg.y, linreg.sigma
    cov = np.linalg.inv(linreg.tau * np.eye(3) + X.T @ X / (s**2 * beta))
    mean = cov @ X.T @ y / (s**2 * beta)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(inf.approx.mean, mean, atol=0.02 * sd.min())
    np.testing.assert_allclose(inf.approx.std, sd, rtol=0.03)


def test_two_groups_fit_together_to_the_block_optimum():
    lr = LinearRegression(n_rows=300, n_coef=3, correlated=True, seed=6)

    def factory(data):
        with pm.Model() as m:
            a = pm.Normal("a", 0.0, 1.0, shape=2)
            b = pm.Normal("b", 0.0, 1.0)
            w = pm.math.concatenate([a, b[None]])
            pm.Normal("y", data["X"] @ w, lr.sigma, observed=data["y"])
        return m

    approx = dv.Approximation([dv.Group(["a"], vfam="full_rank"), dv.Group(None, vfam="mean_field")])
    inf = dv.KLqp(approx, model=factory, data=lr.data, random_seed=1, stl=True)
    inf.fit(5000, obj_n_mc=2, obj_optimizer=dv.adam(learning_rate=schedule(5000)),
            progressbar=False)
    prec = np.linalg.inv(lr.cov)
    cov_a = np.linalg.inv(prec[:2, :2])
    np.testing.assert_allclose(inf.approx.mean, lr.mean, atol=0.1 / np.sqrt(prec.max()))
    np.testing.assert_allclose(inf.approx.cov[:2, :2], cov_a, rtol=0.05, atol=1e-5)
    np.testing.assert_allclose(inf.approx.std[2], 1 / np.sqrt(prec[2, 2]), rtol=0.05)
    assert inf.approx.cov[0, 2] == 0.0


def test_start_and_start_sigma_set_the_initial_q(linreg):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, start={"w": [0.5, -0.5, 1.0]},
                  start_sigma={"w": [0.1, 0.2, 0.3]}, random_seed=0)
    np.testing.assert_allclose(inf.approx.mean, [0.5, -0.5, 1.0])
    np.testing.assert_allclose(inf.approx.std, [0.1, 0.2, 0.3])
    fr = dv.FullRankADVI(model=linreg.factory, data=linreg.data, start_sigma={"w": 0.25})
    np.testing.assert_allclose(fr.approx.cov, 0.0625 * np.eye(3), atol=1e-12)


def test_ready_model_from_context_equals_factory(linreg):
    with pm.Model():
        X = pm.Data("X", linreg.X)
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", X @ w, linreg.sigma, observed=linreg.y)
        ready = dv.fit(100, random_seed=9, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    factory = dv.fit(100, model=linreg.factory, data=linreg.data, random_seed=9,
                     obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    np.testing.assert_allclose(ready.mean, factory.mean, rtol=1e-10)


def test_total_grad_norm_constraint_clips_the_summed_gradient(linreg):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data, random_seed=0)
    start = np.concatenate([np.ravel(v) for v in inf.approx.params_values])
    inf.fit(1, obj_optimizer=dv.sgd(learning_rate=0.1), total_grad_norm_constraint=2.0, progressbar=False)
    moved = np.concatenate([np.ravel(v) for v in inf.approx.params_values]) - start
    np.testing.assert_allclose(np.linalg.norm(moved), 0.1 * 2.0, rtol=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_run_profiling_reports_phases_and_leaves_the_fit_alone(linreg, fused):
    inf = _short_fit(linreg, backend_options={"fused": fused})
    mean, hist = inf.approx.mean.copy(), inf.hist.copy()
    prof = inf.run_profiling(100)
    if fused:  # the block program was compiled by the fit: this run did not compile it
        assert set(prof.phases) == {"compile", "draw", "block", "logging"}
        assert prof.phases["block"] > 0 and prof.phases["compile"] == 0
    else:
        assert set(prof.phases) == {"draw", "workers", "transfer", "update", "logging"}
        assert prof.phases["workers"] > 0 and prof.phases["update"] > 0
    assert 0 < sum(prof.phases.values()) <= prof.wall
    assert set(prof.per_step_us) == set(prof.phases) | {"other"}
    assert "it/s" in str(prof) and "other" in str(prof)
    np.testing.assert_array_equal(inf.approx.mean, mean)
    np.testing.assert_array_equal(inf.hist, hist)


def test_run_profiling_counts_callbacks_as_logging(linreg):
    import time

    inf = _short_fit(linreg)
    calls = []

    def slow(approx, losses, i):
        calls.append(i)
        time.sleep(0.002)

    prof = inf.run_profiling(50, callbacks=[slow])
    assert len(calls) == 50  # a callback that declares no call_every: step by step
    assert prof.phases["logging"] >= 50 * 0.002
    assert prof.phases["logging"] > prof.phases["update"]


def test_a_bad_fit_setting_changes_nothing(linreg):
    inf = _short_fit(linreg)
    before = (inf._optimizer, inf._n_mc, inf._max_norm)
    with pytest.raises(ValueError, match="total_grad_norm_constraint"):
        inf.fit(10, obj_optimizer=dv.sgd(learning_rate=0.1), obj_n_mc=3,
                total_grad_norm_constraint=0)
    assert (inf._optimizer, inf._n_mc, inf._max_norm) == before
    inf.refine(5, progressbar=False)  # still the adam state of the first fit


def test_fit_with_an_inference_refuses_settings_it_would_ignore(linreg):
    inf = dv.ADVI(model=linreg.factory, data=linreg.data)
    with pytest.raises(TypeError, match="random_seed"):
        dv.fit(10, method=inf, random_seed=3)


def test_std_equals_the_square_root_of_the_covariance_diagonal(exact_fullrank):
    approx = exact_fullrank.approx
    np.testing.assert_allclose(approx.std, np.sqrt(np.diag(approx.cov)), rtol=1e-12)
