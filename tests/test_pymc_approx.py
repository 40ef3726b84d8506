"""The approximation and operator objects PyMC code touches: shared parameters, Group,
Approximation outside a fit, sample_node, logq, KL(approx)()(n), scale_cost_to_minibatch.
References: PyMC on the same model and parameters, and closed forms."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor
import pytest
from pymc.variational.operators import KL as PyMCKL

import distvi as dv
from conftest import LinearRegression


@pytest.fixture(scope="module")
def lr() -> LinearRegression:
    return LinearRegression(n_rows=200, n_coef=3, seed=7)


def _ready(lr):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", lr.X @ w, lr.sigma, observed=lr.y)
    return m


def _neg_elbo(lr, mu, sd):
    """E_q[-log p(y, w)] - H(q) for q = N(mu, diag(sd^2)), in closed form."""
    X, y, s = lr.X, lr.y, lr.sigma
    n, d = X.shape
    fit = np.sum((y - X @ mu) ** 2) + np.sum((X**2) @ (sd**2))
    nll = 0.5 * fit / s**2 + n * (np.log(s) + 0.5 * np.log(2 * np.pi))
    nlp = 0.5 * np.sum(mu**2 + sd**2) + 0.5 * d * np.log(2 * np.pi)
    entropy = np.sum(np.log(sd)) + 0.5 * d * (1 + np.log(2 * np.pi))
    return nll + nlp - entropy


def test_params_are_the_same_shared_variables_for_the_whole_fit(lr):
    with _ready(lr):
        inference = dv.ADVI(random_seed=1)
        before = inference.approx.params
        assert all(isinstance(p, pytensor.compile.SharedVariable) for p in before)
        inference.fit(100, progressbar=False)
        after = inference.approx.params
    assert [a is b for a, b in zip(before, after)] == [True, True]
    np.testing.assert_array_equal(after[0].get_value(), inference.approx.mean)


def test_shared_params_set_the_approximation_as_in_pymc(lr):
    mu, rho = np.array([0.5, -1.0, 2.0]), np.array([-1.0, 0.0, 1.0])
    with _ready(lr):
        ours = dv.MeanField()
        theirs = pm.MeanField()
    for approx in (ours, theirs):
        approx.shared_params["mu"].set_value(mu)
        approx.shared_params["rho"].set_value(rho)
    np.testing.assert_allclose(ours.mean, theirs.mean.eval())
    np.testing.assert_allclose(ours.std, theirs.std.eval())
    ours.shared_params = {"mu": np.zeros(3), "rho": np.ones(3)}
    np.testing.assert_array_equal(ours.mean, np.zeros(3))


def test_fit_starts_from_parameters_set_through_shared_variables(lr):
    with _ready(lr):
        approx = dv.MeanField()
        approx.params[0].set_value(lr.mean)
        inference = dv.KLqp(approx, random_seed=2)
        inference.fit(1, progressbar=False, obj_optimizer=dv.sgd(learning_rate=1e-12))
    np.testing.assert_allclose(inference.approx.mean, lr.mean, atol=1e-6)


def test_kl_operator_gives_the_monte_carlo_loss(lr):
    """dv.KL(approx)()(n) is a symbolic estimate drawn afresh on every evaluation; its mean
    equals the closed-form negative ELBO and PyMC's own operator at the same parameters."""
    mu, rho = lr.mean + 0.05, np.full(3, -2.0)
    sd = np.log1p(np.exp(rho))
    with _ready(lr):
        ours, theirs = dv.MeanField(), pm.MeanField()
        for approx in (ours, theirs):
            approx.shared_params["mu"].set_value(mu)
            approx.shared_params["rho"].set_value(rho)
        exact = _neg_elbo(lr, mu, sd)
        estimate = dv.KL(ours)()(4000, random_seed=1)
        first, second = estimate.eval(), estimate.eval()
        pymc_value = np.mean([PyMCKL(theirs)()(4000).eval() for _ in range(3)])
    assert first != second
    assert abs(first - exact) < 0.5 and abs(pymc_value - exact) < 0.5
    half = dv.KL(ours, beta=0.5)()(4000, random_seed=1).eval()
    # beta weights prior and entropy: the estimate moves towards the data term
    assert half < first


def test_kl_operator_of_a_fitted_approximation_uses_its_workers(lr):
    approx = dv.fit(1500, model=lr.factory, data=lr.data, num_workers=2, backend="local",
                    random_seed=3, progressbar=False, obj_optimizer=dv.adam(learning_rate=0.02))
    exact = _neg_elbo(lr, np.asarray(approx.mean), np.asarray(approx.std))
    assert abs(dv.KL(approx)()(4000, random_seed=2).eval() - exact) < 0.5


def test_scale_cost_to_minibatch_divides_the_loss_by_n_over_b(lr):
    """PyMC's meaning: the loss in per-minibatch units, N / B smaller."""
    def first_losses(scale):
        inference = dv.ADVI(model=lr.factory, data=lr.data, batch_size=50, random_seed=4)
        inference.approx.scale_cost_to_minibatch = scale
        inference.fit(3, progressbar=False, obj_optimizer=dv.sgd(learning_rate=1e-4))
        return inference.hist

    full, scaled = first_losses(False), first_losses(True)
    np.testing.assert_allclose(scaled[0], full[0] * 50 / 200, rtol=1e-12)
    with pytest.raises(TypeError, match="True or False"):
        dv.MeanField().scale_cost_to_minibatch = "yes"


def test_scale_cost_default_is_full_data_units(lr):
    assert dv.MeanField().scale_cost_to_minibatch is False


def test_approx_model_is_the_context_model(lr):
    with _ready(lr) as m:
        assert dv.fit(10, progressbar=False).model is m
        assert dv.ADVI().approx.model is m


def test_sample_node_draws_afresh_with_the_moments_of_q(lr):
    with _ready(lr) as m:
        approx = dv.fit(1000, random_seed=5, progressbar=False)
        w = m["w"]
        node = approx.sample_node(w, size=4000, random_seed=1)
        a, b = node.eval(), node.eval()
        assert a.shape == (4000, 3) and not np.array_equal(a, b)
        np.testing.assert_allclose(a.mean(0), approx.mean, atol=4 * approx.std.max() / 60)
        np.testing.assert_allclose(a.std(0), approx.std, rtol=0.06)
        assert approx.sample_node(w).eval().shape == (3,)
        np.testing.assert_allclose(approx.sample_node(2 * w, deterministic=True).eval(),
                                   2 * np.asarray(approx.mean))


def test_sample_node_more_replacements_swap_data(lr):
    with pm.Model() as m:
        X = pm.Data("X", lr.X)
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", X @ w, lr.sigma, observed=lr.y)
        approx = dv.fit(200, random_seed=5, progressbar=False)
    new_X = np.ones((4, 3))
    pred = approx.sample_node(m["X"] @ m["w"], deterministic=True,
                              more_replacements={m["X"]: pytensor.shared(new_X)})
    np.testing.assert_allclose(pred.eval(), new_X @ np.asarray(approx.mean))


def test_sample_node_agrees_with_pymc_at_the_same_parameters(lr):
    mu, rho = np.array([0.3, -0.2, 1.0]), np.array([-1.0, 0.0, 0.5])
    with _ready(lr) as m:
        ours, theirs = dv.MeanField(), pm.MeanField()
        for approx in (ours, theirs):
            approx.shared_params["mu"].set_value(mu)
            approx.shared_params["rho"].set_value(rho)
        expr = pm.math.exp(m["w"])
        a = ours.sample_node(expr, size=20000, random_seed=1).eval()
        b = theirs.sample_node(expr, size=20000).eval()
    np.testing.assert_allclose(a.mean(0), b.mean(0), rtol=0.05)


def test_logq_is_symbolic_and_its_mean_is_minus_the_entropy(lr):
    with _ready(lr):
        approx = dv.fit(300, random_seed=6, progressbar=False)
    values = approx.sample_node(approx.logq, size=20000, random_seed=2).eval()
    sd = np.asarray(approx.std)
    entropy = np.sum(np.log(sd)) + 1.5 * (1 + np.log(2 * np.pi))
    assert values.shape == (20000,)
    assert abs(values.mean() + entropy) < 4 * values.std() / np.sqrt(20000)
    assert approx.logq.eval() != approx.logq.eval()


@pytest.mark.parametrize("spelling", ["FR", "fr", "full_rank", "Full_Rank"])
def test_group_vfam_spellings_as_pymc(lr, spelling):
    with _ready(lr):
        g = dv.Group(None, vfam=spelling)
        assert g.vfam == "full_rank"
        assert type(pm.Group(None, vfam=spelling)).__name__ == "FullRankGroup"


def test_group_family_follows_its_params(lr):
    packed = np.eye(3)[np.tril_indices(3)]
    assert dv.Group(None, params={"mu": np.zeros(3), "L_tril": packed}).vfam == "full_rank"
    assert dv.Group(None, params={"mu": np.zeros(3), "rho": np.zeros(3)}).vfam == "mean_field"
    assert dv.Group(None, params={"histogram": np.zeros((5, 3))}).vfam == "empirical"
    with pytest.raises(KeyError, match="no group takes the params"):
        dv.Group(None, params={"mu": np.zeros(3)})
    with pytest.raises(TypeError, match="do not belong to a mean_field group"):
        dv.Group(None, vfam="mf", params={"mu": np.zeros(3), "L_tril": packed})
    with pytest.raises(KeyError, match="unknown vfam 'nope'"):
        dv.Group(None, vfam="nope")


def test_empirical_group_needs_a_size(lr):
    with pytest.raises(ValueError, match="needs its draws .* or a number of particles"):
        dv.Group(None, vfam="empirical")
    with _ready(lr):
        approx = dv.Approximation([dv.Group(None, vfam="empirical", size=7, random_seed=1)])
    assert approx.histogram.shape == (7, 3)
    with pytest.raises(TypeError, match="size= applies to an empirical group"):
        dv.Group(None, vfam="mf", size=7)


def test_group_lists_its_variables_and_bad_groupings_are_refused_at_build(lr):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        s = pm.HalfNormal("s", 1.0)
        pm.Normal("y", lr.X @ w, s, observed=lr.y)
        approx = dv.Approximation([dv.Group([w], vfam="fr"), dv.Group(None, vfam="mf")])
        assert approx.groups[0].group == [m["w"]] and approx.groups[1].group == [m["s"]]
        assert approx.ndim == 4
        with pytest.raises(ValueError, match="'w' is in more than one group"):
            dv.Approximation([dv.Group([w]), dv.Group([w, s])])
        with pytest.raises(ValueError, match=r"\['s_log__'\] are in no group"):
            dv.Approximation([dv.Group([w])])


def test_approximation_outside_a_fit_samples_its_initial_parameters(lr):
    """Bound to the context model: PyMC's initial q (mu = 0, sd = softplus(0)), drawn."""
    with _ready(lr):
        ours, theirs = dv.MeanField(), pm.MeanField()
        assert ours.ndim == 3
        draws = ours.sample(20000, random_seed=1).posterior["w"].values[0]
        ref = theirs.sample(20000, random_seed=1).posterior["w"].values[0]
    np.testing.assert_allclose(draws.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(draws.std(0), ref.std(0), rtol=0.03)
    np.testing.assert_allclose(draws.std(0), np.log(2.0), rtol=0.03)


def test_operator_and_symbolic_errors_name_the_problem(lr):
    with _ready(lr):
        approx = dv.MeanField()
        with pytest.raises(ValueError, match="nmc must be an int >= 1"):
            dv.KL(approx)()(0)
        with pytest.raises(TypeError, match="KL takes no test function"):
            dv.KL(approx)(lambda x: x)
        with pytest.raises(ValueError, match="size must be >= 1"):
            approx.sample_node(approx.model["w"], size=0)
        particles = dv.Approximation([dv.Group(None, vfam="empirical", size=3, random_seed=1)])
        with pytest.raises(TypeError, match="has no density"):
            particles.logq


def test_total_size_beyond_the_rows_is_refused(lr):
    from distvi.model import ModelError

    Y = np.tile(lr.y[:, None], (1, 2))
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0)
        pm.Normal("y", w, 1.0, observed=Y, total_size=[200, 2])
        with pytest.raises(ModelError, match="total_size beyond its first"):
            dv.ADVI()


def test_tracker_of_mean_eval_records_every_step_as_in_pymc(lr):
    """PyMC's notebook idiom: Tracker(mean=approx.mean.eval) records the moment at each step."""
    with _ready(lr):
        inference = dv.ADVI(random_seed=3)
        approx = inference.approx
        tracker = pm.callbacks.Tracker(mean=approx.mean.eval, std=approx.std.eval)
        inference.fit(20, callbacks=[tracker], progressbar=False,
                      obj_optimizer=dv.adam(learning_rate=0.1))
    means = np.array(tracker["mean"])
    assert means.shape == (20, 3) and len({tuple(m) for m in means}) == 20
    np.testing.assert_array_equal(means[-1], approx.mean)
    np.testing.assert_array_equal(np.array(tracker["std"])[-1], approx.std)
    assert not hasattr(approx.mean[:2], "_source") or approx.mean[:2]._source is None


def test_approximation_pickles_with_its_parameters(lr):
    import cloudpickle

    with _ready(lr):
        approx = dv.fit(50, random_seed=1, progressbar=False)
    again = cloudpickle.loads(cloudpickle.dumps(approx))
    np.testing.assert_array_equal(again.mean, approx.mean)
    assert again.params[0] is not approx.params[0]
    np.testing.assert_array_equal(approx.mean.get_value(), approx.mean)


def test_asvgd_warns_as_pymc_s_and_profile_has_a_summary(lr, capsys):
    with _ready(lr):
        with pytest.warns(UserWarning, match="experimental inference Operator"):
            dv.ASVGD()
        profile = dv.ADVI(random_seed=1).run_profiling(5)
    profile.summary()
    assert "block" in capsys.readouterr().out  # ADVI runs in fused blocks


def test_sample_node_takes_symbolic_size_and_deterministic_as_pymc(lr):
    import pytensor.tensor as pt

    with _ready(lr) as m:
        approx = dv.fit(100, random_seed=1, progressbar=False)
        size, det = pt.iscalar("size"), pt.bscalar("det")
        node = approx.sample_node(m["w"], size=size, deterministic=det)
        fn = pytensor.function([size, det], node)
    assert fn(7, 0).shape == (7, 3)
    np.testing.assert_allclose(fn(2, 1), np.tile(approx.mean, (2, 1)))
    assert not np.array_equal(fn(5, 0), fn(5, 0))


def test_group_is_an_instance_of_its_family_class_as_in_pymc(lr):
    assert type(dv.Group(None, vfam="FR")) is dv.FullRankGroup
    assert type(dv.Group(None, params={"histogram": np.zeros((4, 3))})) is dv.EmpiricalGroup
    assert type(dv.Group(None)) is dv.MeanFieldGroup
    assert dv.MeanFieldGroup(None).vfam == "mean_field"
    assert dv.FullRankGroup.get_param_spec_for(d=4) == {"mu": (4,), "L_tril": (10,)}
    assert (pm.variational.approximations.FullRankGroup.get_param_spec_for(d=4)
            == {"mu": (4,), "L_tril": (10,)})
    with pytest.raises(TypeError, match="a FullRankGroup is a full_rank group, not mean_field"):
        dv.FullRankGroup(None, vfam="mf")
