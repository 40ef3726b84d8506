"""Ready models as PyMC users write them: pm.Minibatch with total_size, models without data,
discrete variables, deterministics of the data. References: closed forms and PyMC itself."""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest

import distvi as dv
from distvi.data import split_batch
from distvi.model import ModelError
from conftest import LinearRegression


@pytest.fixture(scope="module")
def lr() -> LinearRegression:
    return LinearRegression(n_rows=300, n_coef=3, seed=4)


def _minibatch_model(lr, batch_size, total_size, separate=False):
    if separate:  # two pm.Minibatch calls: PyMC draws their rows independently (pymc#6560)
        Xm = pm.Minibatch(lr.X, batch_size=batch_size)
        ym = pm.Minibatch(lr.y, batch_size=batch_size)
    else:
        Xm, ym = pm.Minibatch(lr.X, lr.y, batch_size=batch_size)
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=lr.X.shape[1])
        pm.Normal("y", Xm @ w, lr.sigma, observed=ym, total_size=total_size)
    return m


def test_split_batch_in_proportion_to_the_rows():
    assert split_batch(10, [34, 33, 33]) == [4, 3, 3]
    assert split_batch(100, [150, 150]) == [50, 50]
    assert split_batch(7, [1000, 10, 10]) == [5, 1, 1]      # every shard gets a row
    assert split_batch(500, [100, 100]) == [100, 100]        # at most the shard
    assert sum(split_batch(997, [333, 334, 333])) == 997
    with pytest.raises(ValueError, match="smaller than the 3 shards"):
        split_batch(2, [10, 10, 10])


@pytest.mark.parametrize("separate", [False, True])
def test_minibatch_model_equals_the_factory_on_the_same_rows(lr, separate):
    """A pm.Minibatch model is sharded as its arrays: the same numbers, bit for bit, as the
    factory with the per-shard batches its batch_size splits into (100 over 2 x 150 rows)."""
    with _minibatch_model(lr, 100, 300, separate):
        inf = dv.ADVI(num_workers=2, backend="local", random_seed=3)
        assert inf.shards.batches == [50, 50]
        got = inf.fit(300, progressbar=False)
    ref = dv.ADVI(model=lr.factory, data=lr.data, batch_size=50, num_workers=2,
                  backend="local", random_seed=3)
    ref_approx = ref.fit(300, progressbar=False)
    np.testing.assert_array_equal(got.mean, ref_approx.mean)
    np.testing.assert_array_equal(inf.hist, ref.hist)


def test_minibatch_model_reaches_the_closed_form_posterior(lr):
    """The whole data as one minibatch: the exact gradient, so ADVI reaches the exact
    (diagonal-covariance) answer of a conjugate model."""
    with _minibatch_model(lr, 300, 300):
        approx = dv.fit(4000, random_seed=1, progressbar=False, obj_n_mc=4,
                        obj_optimizer=dv.adam(learning_rate=0.02), average_from=0.5)
    np.testing.assert_allclose(approx.mean, lr.mean, atol=0.01)
    # mean-field sd of a Gaussian posterior: 1 / sqrt(diag(precision))
    mf_sd = 1 / np.sqrt(np.diag(np.linalg.inv(lr.cov)))
    np.testing.assert_allclose(approx.std, mf_sd, rtol=0.08)


def test_total_size_other_than_the_rows_is_refused(lr):
    with _minibatch_model(lr, 100, 1000):
        with pytest.raises(ModelError, match=r"total_size=1000, but the data given has 300 rows"):
            dv.ADVI()


def test_total_size_equal_to_the_rows_on_a_full_data_model_is_scale_one(lr):
    """total_size = N on a full-data model is PyMC's scale 1: the same fit as without it."""
    def ready(total):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            pm.Normal("y", lr.X @ w, lr.sigma, observed=lr.y, total_size=total)
        return m

    fits = []
    for total in (300, None):
        with ready(total):
            fits.append(dv.fit(200, random_seed=2, progressbar=False).mean)
    np.testing.assert_array_equal(*fits)


def test_minibatch_batch_sizes_must_agree(lr):
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0, shape=2)
        pm.Normal("y1", w[0], 1.0, observed=pm.Minibatch(lr.y, batch_size=10), total_size=300)
        pm.Normal("y2", w[1], 1.0, observed=pm.Minibatch(lr.y, batch_size=20), total_size=300)
        with pytest.raises(ModelError, match=r"different batch sizes \[10, 20\]"):
            dv.ADVI()


def test_explicit_batch_size_wins_over_the_minibatch(lr):
    with _minibatch_model(lr, 100, 300):
        assert dv.ADVI(num_workers=2, backend="local", batch_size=30).shards.batches == [30, 30]


def test_model_without_data_fits_on_the_driver():
    """Priors and a potential only: x ~ N(1, 2^2) times exp(-x^2 / 2) is N(0.2, 0.8)."""
    with pm.Model():
        x = pm.Normal("x", 1.0, 2.0)
        pm.Potential("p", -0.5 * x**2)
        inference = dv.ADVI(random_seed=5)
        approx = inference.fit(3000, progressbar=False, obj_n_mc=8, average_from=0.5,
                               obj_optimizer=dv.adam(learning_rate=0.02))
    assert inference._backend.num_workers == 0
    np.testing.assert_allclose(approx.mean, [0.2], atol=0.03)
    np.testing.assert_allclose(approx.std, [np.sqrt(0.8)], rtol=0.05)


def test_model_without_data_warns_that_workers_are_not_used():
    with pm.Model():
        pm.Normal("x", 0.0, 1.0)
        with pytest.warns(UserWarning, match="no observed data"):
            inference = dv.ADVI(num_workers=2, backend="ray")
    assert inference.backend_name == "local"


def test_discrete_variable_message_comes_first(lr):
    with pm.Model():
        k = pm.Poisson("k", 3.0, shape=300)  # also sized by the rows
        pm.Normal("y", k, 1.0, observed=lr.y)
        with pytest.raises(ModelError, match=r"'k' is discrete.*marginalise.*pm.sample"):
            dv.ADVI()


def test_data_deterministics_are_computed_on_the_workers(lr):
    """A row-sized deterministic comes back for every draw, rows in order over shards that
    minibatch (shuffled inside the workers), equal to the draws' own X @ w."""
    with pm.Model(coords={"obs": np.arange(300)}):
        X = pm.Data("X", lr.X)
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        mu = pm.Deterministic("mu", X @ w, dims="obs")
        pm.Normal("y", mu, lr.sigma, observed=lr.y)
        approx = dv.fit(50, num_workers=2, backend="local", batch_size=40, random_seed=1,
                        progressbar=False)
    idata = approx.sample(25, random_seed=2)
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw", "obs")
    np.testing.assert_allclose(post["mu"].values[0], post["w"].values[0] @ lr.X.T, atol=1e-12)


def test_minibatch_deterministics_are_full_rows(lr):
    Xm, ym = pm.Minibatch(lr.X, lr.y, batch_size=50)
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        mu = pm.Deterministic("mu", Xm @ w)
        pm.Normal("y", mu, lr.sigma, observed=ym, total_size=300)
        approx = dv.fit(20, num_workers=3, backend="local", random_seed=1, progressbar=False)
    post = approx.sample(5, random_seed=2).posterior
    np.testing.assert_allclose(post["mu"].values[0], post["w"].values[0] @ lr.X.T, atol=1e-12)


def test_deterministics_not_row_by_row_are_named_in_a_warning(lr):
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Deterministic("total", (lr.X @ w).sum())
        pm.Normal("y", lr.X @ w, lr.sigma, observed=lr.y)
        approx = dv.fit(10, random_seed=1, progressbar=False)
    with pytest.warns(UserWarning, match=r"deterministics \['total'\] depend on the data but not row"):
        idata = approx.sample(5)
    assert "total" not in idata.posterior and "w" in idata.posterior


def test_deterministics_over_the_size_limit_are_named_in_a_warning(lr, monkeypatch):
    import distvi.results as results

    monkeypatch.setattr(results, "DETERMINISTICS_MAX_MB", 0.01)
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Deterministic("mu", lr.X @ w)
        pm.Normal("y", lr.X @ w, lr.sigma, observed=lr.y)
        approx = dv.fit(10, random_seed=1, progressbar=False)
    with pytest.warns(UserWarning, match=r"deterministics \['mu'\] .* limit"):
        idata = approx.sample(20)
    assert "mu" not in idata.posterior
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert approx.sample(2).posterior["mu"].shape == (1, 2, 300)  # under the limit


def test_minibatch_model_against_pymc_fit(lr):
    """PyMC on the same pm.Minibatch model and optimizer (full batch, so no minibatch noise in
    either; one draw per step, as PyMC 5.28 fails to compile more with a Minibatch): both
    reach the same mean-field answer, within PyMC's last-iterate noise."""
    with _minibatch_model(lr, 300, 300):
        ours = dv.fit(4000, random_seed=1, progressbar=False, average_from=0.5,
                      obj_optimizer=dv.adam(learning_rate=0.01))
        theirs = pm.fit(4000, random_seed=1, progressbar=False,
                        obj_optimizer=pm.adam(learning_rate=0.01))
    np.testing.assert_allclose(ours.mean, theirs.mean.eval(), atol=0.08)  # ~1 posterior sd
    np.testing.assert_allclose(ours.std, theirs.std.eval(), rtol=0.3)


def test_minibatch_model_on_ray_equals_local_with_its_deterministics(lr, ray_cluster):
    """The per-shard batches travel to the actors, and the actors compute the data
    deterministics: Ray gives the local step-by-step numbers exactly, and the local fused
    blocks' to 1e-10."""
    def run(backend, options=None):
        Xm, ym = pm.Minibatch(lr.X, lr.y, batch_size=70)
        with pm.Model():
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            mu = pm.Deterministic("mu", Xm @ w)
            pm.Normal("y", mu, lr.sigma, observed=ym, total_size=300)
            with dv.ADVI(num_workers=2, backend=backend, random_seed=8,
                         backend_options=options) as inference:
                approx = inference.fit(100, progressbar=False)
                return inference.hist, approx.sample(4, random_seed=1).posterior

    (h_local, p_local), (h_ray, p_ray) = run("local", {"fused": False}), run("ray")
    np.testing.assert_array_equal(h_local, h_ray)
    np.testing.assert_array_equal(p_local["mu"].values, p_ray["mu"].values)
    h_fused, p_fused = run("local")
    np.testing.assert_allclose(h_fused, h_ray, rtol=1e-10)
    np.testing.assert_allclose(p_fused["mu"].values, p_ray["mu"].values, rtol=1e-10)
    np.testing.assert_allclose(p_ray["mu"].values[0], p_ray["w"].values[0] @ lr.X.T, atol=1e-12)


def test_minibatch_of_pm_data_with_int32_labels_keeps_the_data_names():
    """PyMC's own idiom for a minibatched logistic regression (int32 labels, pm.Data): the
    pm.Data names are the arrays sharded, and the fit equals the factory's bit for bit."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 2))
    y = (rng.random(400) < 1 / (1 + np.exp(-X @ [1.0, -1.0]))).astype("int32")
    with pm.Model():
        Xm, ym = pm.Minibatch(pm.Data("X", X), pm.Data("labels", y), batch_size=50)
        w = pm.Normal("w", 0.0, 1.0, shape=2)
        pm.Bernoulli("y", logit_p=Xm @ w, observed=ym, total_size=400)
        inference = dv.ADVI(num_workers=2, backend="local", random_seed=1)
        assert sorted(inference.source.arrays) == ["X", "labels"]
        ours = inference.fit(200, progressbar=False)

    def factory(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=2)
            pm.Bernoulli("y", logit_p=data["X"] @ w, observed=data["labels"])
        return m

    ref = dv.fit(200, model=factory, data={"X": X, "labels": y}, batch_size=25, num_workers=2,
                 backend="local", random_seed=1, progressbar=False)
    np.testing.assert_array_equal(ours.mean, ref.mean)


def test_minibatch_model_keeps_its_initial_values(lr):
    """initval= on a free variable of a pm.Minibatch model is the start, as in PyMC."""
    Xm, ym = pm.Minibatch(lr.X, lr.y, batch_size=30)
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0, shape=3, initval=np.array([0.5, -0.5, 2.0]))
        pm.Normal("y", Xm @ w, lr.sigma, observed=ym, total_size=300)
        inference = dv.ADVI()
    np.testing.assert_array_equal(inference.approx.mean, [0.5, -0.5, 2.0])


def test_discrete_error_is_also_pymc_s_parametrization_error(lr):
    from pymc.variational.opvi import ParametrizationError

    with pm.Model():
        pm.Poisson("k", 3.0)
        pm.Normal("y", 0.0, 1.0, observed=lr.y)
        with pytest.raises(ParametrizationError, match="'k' is discrete"):
            dv.ADVI()
