"""The model adapter against PyMC itself: layout, prior term, data term, gradients."""

import numpy as np
import pymc as pm
import pytest

from distvi.model import DataSchema, ModelAdapter

from conftest import logistic_factory


@pytest.fixture(scope="module")
def adapted(logistic_data):
    return ModelAdapter.from_factory(logistic_factory, DataSchema.of(logistic_data))


def _pymc_model(data):
    """The same model, built by PyMC on the full data."""
    return logistic_factory({k: pm.math.constant(v) for k, v in data.items()})


def _point(adapter, z):
    return {lay.name: z[lay.slice].reshape(lay.shape) for lay in adapter.layout}


def test_layout_follows_pymc_value_vars(adapted):
    assert [lay.name for lay in adapted.layout] == ["w", "b", "s_log__"]
    assert [lay.shape for lay in adapted.layout] == [(3,), (), ()]
    assert adapted.ndim == 5
    assert adapted.layout[2].transform == "LogTransform"


def test_prior_and_data_terms_equal_pymc(adapted, logistic_data):
    m = _pymc_model(logistic_data)
    z = np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    varlogp = m.compile_logp(vars=m.free_RVs, jacobian=True)(_point(adapted, z))
    datalogp = m.compile_logp(vars=m.observed_RVs)(_point(adapted, z))
    import pytensor

    prior = pytensor.function([adapted.z], adapted.prior_logp)(z)
    logp, _ = adapted.compile_data_term(1)(z[None], *logistic_data.values(), np.array(1.0))
    np.testing.assert_allclose(prior, varlogp, rtol=1e-12)
    np.testing.assert_allclose(logp[0], datalogp, rtol=1e-12)


def test_data_gradient_equals_finite_differences(adapted, logistic_data):
    fn = adapted.compile_data_term(1)
    z = np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    rows = list(logistic_data.values())
    _, grad = fn(z[None], *rows, np.array(1.0))
    h = 1e-6
    fd = [
        (fn((z + h * e)[None], *rows, np.array(1.0))[0][0]
         - fn((z - h * e)[None], *rows, np.array(1.0))[0][0]) / (2 * h)
        for e in np.eye(5)
    ]
    np.testing.assert_allclose(grad[0], fd, rtol=1e-6, atol=1e-6)


def test_vectorised_points_equal_one_at_a_time(adapted, logistic_data):
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(4, 5))
    rows = list(logistic_data.values())
    logp4, grad4 = adapted.compile_data_term(4)(Z, *rows, np.array(2.0))
    one = adapted.compile_data_term(1)
    for i in range(4):
        lp, g = one(Z[i:i + 1], *rows, np.array(2.0))
        np.testing.assert_allclose(logp4[i], lp[0], rtol=1e-12)
        np.testing.assert_allclose(grad4[i], g[0], rtol=1e-10, atol=1e-12)


def test_ready_model_shards_its_data_and_matches_factory(logistic_data):
    with pm.Model() as ready:
        X = pm.Data("X", logistic_data["X"])
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        b = pm.Normal("b", 0.0, 2.0)
        pm.HalfNormal("s", 1.0)
        pm.Bernoulli("y", logit_p=X @ w + b, observed=logistic_data["y"])
    adapter, arrays = ModelAdapter.from_model(ready)
    assert set(arrays) == {"X", "y"}
    z = np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    fn = adapter.compile_data_term(1)
    half = {k: v[:100] for k, v in arrays.items()}
    lp, _ = fn(z[None], *half.values(), np.array(1.0))
    reference = ModelAdapter.from_factory(logistic_factory, DataSchema.of(logistic_data))
    ref = reference.compile_data_term(1)(z[None], logistic_data["X"][:100],
                                         logistic_data["y"][:100], np.array(1.0))[0]
    np.testing.assert_allclose(lp, ref, rtol=1e-12)


def test_potential_on_parameters_is_prior_and_on_data_is_data(logistic_data):
    def factory(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=3)
            pm.Potential("shrink", -0.5 * (w**2).sum())
            pm.Potential("lik", -0.5 * ((data["X"] @ w) ** 2).sum())
        return m

    ad = ModelAdapter.from_factory(factory, DataSchema.of(logistic_data))
    import pytensor

    z = np.array([0.2, -0.1, 0.3])
    prior = pytensor.function([ad.z], ad.prior_logp)(z)
    expected_prior = -0.5 * 3 * np.log(2 * np.pi) - z @ z
    np.testing.assert_allclose(prior, expected_prior, rtol=1e-12)
    lp, _ = ad.compile_data_term(1)(z[None], *logistic_data.values(), np.array(1.0))
    np.testing.assert_allclose(lp[0], -0.5 * np.sum((logistic_data["X"] @ z) ** 2), rtol=1e-12)


def test_start_takes_constrained_and_unconstrained_names(adapted):
    flat = adapted.flat_from_start({"s": 2.0, "w": [1.0, 2.0, 3.0]})
    np.testing.assert_allclose(flat, [1.0, 2.0, 3.0, 0.0, np.log(2.0)])
    flat = adapted.flat_from_start({"s_log__": 0.5})
    assert flat[4] == 0.5


def test_a_size_from_a_trailing_data_dimension_is_global(logistic_data):
    def factory(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0.0, 1.0, shape=data["X"].shape[1])
            pm.Bernoulli("y", logit_p=data["X"] @ w, observed=data["y"])
        return m

    ad = ModelAdapter.from_factory(factory, DataSchema.of(logistic_data))
    assert ad.layout[0].shape == (3,)


def test_total_size_in_a_factory_must_equal_the_rows(logistic_data):
    from distvi.model import ModelError

    def factory(total):
        def build(data):
            with pm.Model() as m:
                w = pm.Normal("w", 0.0, 1.0, shape=3)
                pm.Bernoulli("y", logit_p=data["X"] @ w, observed=data["y"], total_size=total)
            return m
        return build

    schema = DataSchema.of(logistic_data)
    with pytest.raises(ModelError, match=r"'y' has total_size=601, but the data given has 600 rows"):
        ModelAdapter.from_factory(factory(601), schema, n_rows=600)
    # equal to the rows: the scale is 1, and the data term is the plain model's
    same = ModelAdapter.from_factory(factory(600), schema, n_rows=600)
    plain = ModelAdapter.from_factory(factory(None), schema, n_rows=600)
    z = np.array([[0.3, -0.2, 0.1]])
    rows = [logistic_data["X"], logistic_data["y"]]
    np.testing.assert_array_equal(same.compile_data_term(1)(z, *rows, np.array(1.0))[0],
                                  plain.compile_data_term(1)(z, *rows, np.array(1.0))[0])


def test_ready_model_with_a_per_row_free_variable_is_refused(logistic_data):
    from distvi.model import ModelError

    with pm.Model() as ready:
        z = pm.Normal("z", 0.0, 1.0, shape=600)
        pm.Normal("y", z, 1.0, observed=logistic_data["X"][:, 0])
    with pytest.raises(ModelError, match="'z' has a dimension of length 600"):
        ModelAdapter.from_model(ready)
