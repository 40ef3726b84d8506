"""Results of a fit: draws as InferenceData, moments, log density, params, Empirical."""

import numpy as np
import pytest
import scipy.stats as st
from pytensor.compile.sharedvalue import SharedVariable

import distvi as dv
from conftest import logistic_factory
from distvi.families import softplus, softplus_inv


@pytest.fixture(scope="module")
def logistic(logistic_data):
    """A mean-field ADVI fit of the logistic model (w[coef], b, s > 0, w_scaled = w * s)."""
    inference = dv.ADVI(model=logistic_factory, data=logistic_data, backend="local", random_seed=5)
    inference.fit(1000, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False)
    return inference


@pytest.fixture(scope="module")
def exact(linreg):
    """A full-rank approximation set to linreg's closed-form posterior (bound, not fitted)."""
    L = np.linalg.cholesky(linreg.cov)
    rows, cols = np.tril_indices(3)
    packed = L[rows, cols]
    packed[rows == cols] = softplus_inv(np.diag(L))
    group = dv.Group(None, vfam="full_rank", params={"mu": linreg.mean, "L_tril": packed})
    return dv.KLqp(dv.Approximation([group]), model=linreg.factory, data=linreg.data,
                   backend="local", random_seed=0).approx


# ------------------------------------------------------------------ sample()
def test_sample_has_one_chain_and_the_draws(logistic):
    post = logistic.approx.sample(250, random_seed=0).posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 250
    assert set(post.data_vars) == {"w", "b", "s", "w_scaled"}


def test_sample_uses_model_dims_and_coords(logistic):
    post = logistic.approx.sample(20, random_seed=0).posterior
    assert post["w"].dims == ("chain", "draw", "coef")
    assert post["w_scaled"].dims == ("chain", "draw", "coef")
    assert post["b"].dims == ("chain", "draw")
    assert list(post["coef"].values) == ["x0", "x1", "x2"]


def test_sample_deterministic_is_computed_per_draw(logistic):
    post = logistic.approx.sample(100, random_seed=1).posterior
    w, s = post["w"].values[0], post["s"].values[0]
    np.testing.assert_allclose(post["w_scaled"].values[0], w * s[:, None], rtol=1e-12)


def test_sample_is_constrained_and_omits_value_vars_by_default(logistic):
    post = logistic.approx.sample(500, random_seed=2).posterior
    assert np.all(post["s"].values > 0)
    assert "s_log__" not in post


def test_include_transformed_adds_value_variables(logistic):
    post = logistic.approx.sample(100, random_seed=3, include_transformed=True).posterior
    assert post["s_log__"].dims == ("chain", "draw")
    np.testing.assert_allclose(np.exp(post["s_log__"].values), post["s"].values, rtol=1e-12)
    assert np.any(post["s_log__"].values < 0)  # really the unconstrained value


def test_same_seed_same_draws_other_seed_other_draws(logistic):
    approx = logistic.approx
    a, b, c = (approx.sample(50, random_seed=seed).posterior for seed in (7, 7, 8))
    np.testing.assert_array_equal(a["w"].values, b["w"].values)
    np.testing.assert_array_equal(a["s"].values, b["s"].values)
    assert not np.any(a["w"].values == c["w"].values)


def test_sample_approx_includes_transformed_by_default(logistic):
    idata = dv.sample_approx(logistic.approx, 30, random_seed=4)
    assert "s_log__" in idata.posterior
    same = logistic.approx.sample(30, random_seed=4, include_transformed=True).posterior
    for name in ("w", "b", "s", "w_scaled", "s_log__"):
        np.testing.assert_array_equal(idata.posterior[name].values, same[name].values)


# ------------------------------------------------------------------ exact full-rank
def test_full_rank_packing_gives_the_closed_form_moments(exact, linreg):
    np.testing.assert_allclose(exact.mean, linreg.mean, rtol=1e-12)
    np.testing.assert_allclose(exact.cov, linreg.cov, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(exact.std, np.sqrt(np.diag(linreg.cov)), rtol=1e-10)
    np.testing.assert_array_equal(exact.cov.eval(), np.asarray(exact.cov))  # PyMC-style .eval()


def test_full_rank_draws_match_closed_form(exact, linreg):
    w = exact.sample(20000, random_seed=11).posterior["w"].values[0]
    sd = np.sqrt(np.diag(linreg.cov))
    # sample mean: within 4 standard errors (sd / sqrt(20000)) of the exact mean
    assert np.all(np.abs(w.mean(0) - linreg.mean) < 4 * sd / np.sqrt(20000))
    # sample covariance: within 5 % of the largest variance (its s.e. is ~1 %)
    np.testing.assert_allclose(np.cov(w, rowvar=False), linreg.cov, atol=0.05 * sd.max() ** 2)
    np.testing.assert_allclose(np.var(w, axis=0), sd**2, rtol=0.05)


def test_logq_equals_scipy_multivariate_normal(exact, linreg):
    points = np.random.default_rng(3).multivariate_normal(linreg.mean, 4 * linreg.cov, size=6)
    expected = st.multivariate_normal(linreg.mean, linreg.cov).logpdf(points)
    np.testing.assert_allclose(exact.logq_at(points), expected, rtol=1e-10)


def test_logq_of_mean_field_equals_scipy_normal(logistic):
    approx = logistic.approx
    points = approx.mean + approx.std * np.random.default_rng(4).normal(size=(5, approx.ndim))
    expected = st.norm(approx.mean, approx.std).logpdf(points).sum(axis=1)
    np.testing.assert_allclose(approx.logq_at(points), expected, rtol=1e-10)


# ------------------------------------------------------------------ moments and params
def test_mean_data_and_std_data_by_value_variable(logistic):
    approx = logistic.approx
    assert [v.name for v in logistic.model.value_vars] == ["w", "b", "s_log__"]
    mu, sigma = approx.groups[0].params["mu"], softplus(approx.groups[0].params["rho"])
    for data, flat in ((approx.mean_data, mu), (approx.std_data, sigma)):
        assert set(data.data_vars) == {"w", "b", "s_log__"}
        assert data["w"].shape == (3,) and data["b"].shape == () and data["s_log__"].shape == ()
        np.testing.assert_allclose(data["w"].values, flat[:3], rtol=1e-12)
        np.testing.assert_allclose(data["b"].values, flat[3], rtol=1e-12)
        np.testing.assert_allclose(data["s_log__"].values, flat[4], rtol=1e-12)


def test_mean_data_and_std_data_use_model_dims_and_coords(logistic):
    # as PyMC's Approximation.var_to_data: a variable with dims gets them, with the coords
    for data in (logistic.approx.mean_data, logistic.approx.std_data):
        assert data["w"].dims == ("coef",)
        assert list(data["coef"].values) == ["x0", "x1", "x2"]
        assert data["b"].dims == () and data["s_log__"].dims == ()


def test_mean_data_and_std_data_agree_with_draws(logistic):
    approx = logistic.approx
    post = approx.sample(20000, random_seed=6, include_transformed=True).posterior
    for name in ("w", "b", "s_log__"):
        draws = post[name].values[0]
        sd = approx.std_data[name].values
        # means within 4 s.e.; sds within 3 % (s.e. of a sample sd is ~0.5 % here)
        assert np.all(np.abs(draws.mean(0) - approx.mean_data[name].values) < 4 * sd / np.sqrt(20000))
        np.testing.assert_allclose(draws.std(0), sd, rtol=0.03)


def test_params_are_shared_variables_with_current_values(logistic):
    approx = logistic.approx
    params = approx.params
    assert all(isinstance(p, SharedVariable) for p in params)
    assert [p.name for p in params] == ["mu", "rho"]
    np.testing.assert_array_equal(params[0].get_value(), approx.mean)
    np.testing.assert_allclose(softplus(params[1].get_value()), approx.std, rtol=1e-12)


def test_params_follow_further_fitting(logistic):
    before = [p.get_value().copy() for p in logistic.approx.params]
    logistic.refine(20, progressbar=False)
    after = logistic.approx.params
    assert all(not np.array_equal(a.get_value(), b) for a, b in zip(after, before))
    np.testing.assert_array_equal(after[0].get_value(), logistic.approx.mean)


# ------------------------------------------------------------------ sample_node
def test_sample_node_matches_numpy_on_the_same_draws(logistic):
    approx, model = logistic.approx, logistic.model
    node = model["s"] * model["w"].sum()
    post = approx.sample(40, random_seed=9).posterior
    expected = post["s"].values[0] * post["w"].values[0].sum(axis=-1)
    got = approx.sample_node(node, size=40, random_seed=9).eval()
    assert got.shape == (40,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_sample_node_without_size_is_one_draw(logistic):
    approx, model = logistic.approx, logistic.model
    post = approx.sample(1, random_seed=10).posterior
    got = approx.sample_node(model["w"].sum(), random_seed=10).eval()
    assert np.shape(got) == ()
    np.testing.assert_allclose(got, post["w"].values[0, 0].sum(), rtol=1e-12)


# ------------------------------------------------------------------ Empirical
@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(12)
    T = 30
    return {"w": rng.normal(size=(T, 3)), "b": rng.normal(size=T), "s": rng.gamma(2.0, size=T)}


@pytest.fixture(scope="module")
def empirical(draws, logistic_data):
    return dv.Empirical(draws, model=logistic_factory, data=logistic_data)


def test_empirical_sample_returns_the_given_draws(empirical, draws):
    post = empirical.sample(200, random_seed=0).posterior
    given = np.column_stack([draws["w"], draws["b"], draws["s"]])
    got = np.column_stack([post["w"].values[0], post["b"].values[0], post["s"].values[0]])
    # every sampled (w, b, s) is one whole given row
    match = np.all(np.isclose(got[:, None, :], given[None, :, :], rtol=1e-12, atol=0), axis=-1)
    assert np.all(match.sum(axis=1) == 1)
    assert len(np.unique(match.argmax(axis=1))) > 20  # and many rows are used


def test_empirical_moments_are_numpys_on_unconstrained_draws(empirical, draws):
    flat = np.column_stack([draws["w"], draws["b"], np.log(draws["s"])])
    np.testing.assert_allclose(empirical.mean, flat.mean(axis=0), rtol=1e-12)
    # PyMC's Empirical.cov divides by the number of draws (bias=True)
    np.testing.assert_allclose(empirical.cov, np.cov(flat, rowvar=False, bias=True), rtol=1e-10)
    np.testing.assert_allclose(empirical.mean_data["s_log__"].values, np.log(draws["s"]).mean(), rtol=1e-12)


def test_empirical_from_value_variable_draws(draws, logistic_data):
    unconstrained = {"w": draws["w"], "b": draws["b"], "s_log__": np.log(draws["s"])}
    empirical = dv.Empirical(unconstrained, model=logistic_factory, data=logistic_data)
    post = empirical.sample(50, random_seed=1).posterior
    s = post["s"].values[0]
    assert np.all(np.isclose(s[:, None], draws["s"][None, :], rtol=1e-12, atol=0).any(axis=1))


def test_empirical_from_inference_data(logistic, logistic_data):
    idata = logistic.approx.sample(25, random_seed=13)
    post = idata.posterior
    empirical = dv.Empirical(idata, model=logistic_factory, data=logistic_data)
    flat = np.column_stack([post["w"].values[0], post["b"].values[0], np.log(post["s"].values[0])])
    np.testing.assert_allclose(empirical.mean, flat.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(empirical.cov, np.cov(flat, rowvar=False, bias=True), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("family", ["mean_field", "full_rank"])
def test_family_maths_agree_with_the_gaussian_formulas(family):
    """Each family is written once, symbolically; its compiled draws, moments, entropy and
    log density agree with the Gaussian formulas written here in numpy."""
    from distvi.families import FAMILIES

    fam = FAMILIES[family]()
    rng = np.random.default_rng(7)
    d = 4
    params = fam.init(rng.normal(size=d), np.abs(rng.normal(size=d)) + 0.1)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in params.items()}
    if family == "mean_field":
        L = np.diag(softplus(params["rho"]))
    else:
        L = np.zeros((d, d))
        L[np.tril_indices(d)] = params["L_tril"]
        L[np.diag_indices(d)] = softplus(np.diag(L))
    eps = rng.normal(size=(5, d))
    cov = L @ L.T
    np.testing.assert_allclose(fam.evaluate("draw", params, eps), params["mu"] + eps @ L.T,
                               rtol=1e-12)
    np.testing.assert_allclose(fam.evaluate("cov", params), cov, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fam.evaluate("var", params), np.diag(cov), rtol=1e-12)
    np.testing.assert_allclose(fam.evaluate("std", params), np.sqrt(np.diag(cov)), rtol=1e-12)
    np.testing.assert_array_equal(fam.evaluate("mean", params), params["mu"])
    gaussian_entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1]
    np.testing.assert_allclose(fam.evaluate("entropy", params), gaussian_entropy, rtol=1e-12)
    z = params["mu"] + eps @ L.T
    r = np.linalg.solve(L, (z - params["mu"]).T).T
    logq = -0.5 * np.sum(r**2, axis=1) - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1]
    np.testing.assert_allclose(fam.evaluate("logq", params, z), logq, rtol=1e-12)


def test_empirical_family_moments_and_picks():
    from distvi.families import EmpiricalFamily

    h = np.random.default_rng(3).normal(size=(9, 3))
    fam = EmpiricalFamily()
    np.testing.assert_allclose(fam.evaluate("mean", {"histogram": h}), h.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fam.evaluate("cov", {"histogram": h}),
                               np.cov(h, rowvar=False, bias=True), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fam.evaluate("var", {"histogram": h}), h.var(axis=0), rtol=1e-12)
    picks = np.array([4, 0, 4])
    np.testing.assert_array_equal(
        fam.evaluate("draw", {"histogram": h}, np.zeros((3, 3)), picks), h[picks])
    with pytest.raises(TypeError, match="no density"):
        fam.logq({"histogram": None}, None)
