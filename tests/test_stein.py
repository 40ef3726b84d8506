"""Stein methods (SVGD, ASVGD, KSD, Stein, RBF) against PyMC and closed-form posteriors."""

import os
import sys

import numpy as np
import pymc as pm
import pytest

import distvi as dv
from distvi.backends.ray import ShardActor
from distvi.stein import particle_bounds

from conftest import LinearRegression


def with_scale(lr):
    """Bayesian linear regression with an unknown noise scale (a transformed variable)."""

    def factory(data):
        with pm.Model() as m:
            w = pm.Normal("w", 0, 1, shape=lr.X.shape[1])
            s = pm.HalfNormal("s", 1.0)
            pm.Normal("y", data["X"] @ w, s, observed=data["y"])
        return m

    with pm.Model() as ready:
        w = pm.Normal("w", 0, 1, shape=lr.X.shape[1])
        s = pm.HalfNormal("s", 1.0)
        pm.Normal("y", pm.math.dot(lr.X, w), s, observed=lr.y)
    return factory, ready


@pytest.fixture(scope="module")
def small():
    return LinearRegression(n_rows=100, n_coef=3, seed=7)


@pytest.fixture(scope="module")
def pymc_step(small):
    """One PyMC SVGD step with sgd(learning_rate=1): new particles = old + Stein direction."""
    _, ready = with_scale(small)
    inference = pm.SVGD(n_particles=10, model=ready, random_seed=1)
    before = inference.approx.histogram.get_value().copy()
    inference.fit(1, obj_optimizer=pm.sgd(learning_rate=1.0), progressbar=False)
    return before, inference.approx.histogram.get_value().copy()


def test_one_step_equals_pymc_svgd(small, pymc_step):
    before, after = pymc_step
    factory, _ = with_scale(small)
    inf = dv.SVGD(n_particles=10, model=factory, data=small.data, random_seed=1)
    inf.approx.groups[0].params["histogram"] = before.copy()
    inf.fit(1, obj_optimizer=dv.sgd(learning_rate=1.0), progressbar=False)
    assert np.abs(after - before).max() > 1.0  # the step moved the particles
    np.testing.assert_allclose(inf.approx.histogram, after, rtol=1e-10, atol=1e-9)


def test_stein_attributes_equal_pymc_direction_and_kernel(small, pymc_step):
    from pymc.variational.test_functions import rbf as pymc_rbf

    before, after = pymc_step
    factory, _ = with_scale(small)
    approx = dv.Empirical({"w": before[:, :3], "s_log__": before[:, 3]}, model=factory, data=small.data)
    stein = dv.Stein(approx)
    np.testing.assert_allclose(stein.grad, after - before, rtol=1e-10, atol=1e-9)
    K, dxk = pymc_rbf(before)
    np.testing.assert_allclose(stein.Kxy, K.eval(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stein.dxkxy, dxk.eval(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stein.density_part_grad, stein.Kxy @ stein.dlogp)
    assert stein.repulsive_part_grad is stein.dxkxy
    # dlogp is the model's gradient: PyMC's dlogp at one particle
    ready = with_scale(small)[1]
    dlogp = ready.compile_dlogp(jacobian=True)
    point = {"w": before[2, :3], "s_log__": before[2, 3]}
    np.testing.assert_allclose(stein.dlogp[2], dlogp(point), rtol=1e-10)
    np.testing.assert_allclose(stein.logp_norm[2], ready.compile_logp()(point), rtol=1e-12)
    hot = dv.Stein(approx, temperature=2.0)
    np.testing.assert_allclose(hot.grad, (stein.density_part_grad / 2 + stein.dxkxy) / 10)


def test_phi_by_slices_equals_whole():
    rng = np.random.default_rng(0)
    X, G = rng.normal(size=(37, 5)), rng.normal(size=(37, 5))
    k = dv.RBF()
    h = k.bandwidth(X)
    whole = k.phi_rows(X, G, h, 1.5)
    parts = np.concatenate([k.phi_rows(X, G, h, 1.5, lo, hi) for lo, hi in particle_bounds(37, 3)])
    np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-14)
    # the median heuristic, by a full sort
    H = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1).ravel()
    np.testing.assert_allclose(h, 0.5 * np.median(H) / np.log(38), rtol=1e-10)
    even = X[:36]
    H = ((even[:, None, :] - even[None, :, :]) ** 2).sum(-1).ravel()
    np.testing.assert_allclose(k.bandwidth(even), 0.5 * np.median(H) / np.log(37), rtol=1e-10)
    # identical particles: no NaN
    assert np.all(np.isfinite(k.phi_rows(np.ones((4, 2)), G[:4, :2], k.bandwidth(np.ones((4, 2))), 1.0)))


def schedule(total, lr0=0.05, end=2e-3, flat=0.5):
    """Constant for the first ``flat`` share of the steps, then a geometric decay to ``end``."""
    return lambda step: lr0 * (end / lr0) ** min(max(step / total - flat, 0) / (1 - flat), 1.0)


@pytest.fixture(scope="module")
def linreg3():
    return LinearRegression(n_rows=400, n_coef=3, seed=0)


def check_posterior(approx, lr, mean_sd=0.3, sd_rtol=0.2):
    sd = np.sqrt(np.diag(lr.cov))
    assert np.all(np.abs(approx.mean - lr.mean) < mean_sd * sd), (approx.mean - lr.mean) / sd
    np.testing.assert_allclose(approx.std, sd, rtol=sd_rtol)


def test_svgd_recovers_the_exact_posterior(linreg3):
    approx = dv.fit(1500, method="svgd", model=linreg3.factory, data=linreg3.data, random_seed=2,
                    inf_kwargs={"n_particles": 200},
                    obj_optimizer=dv.adam(learning_rate=schedule(1500)), progressbar=False)
    check_posterior(approx, linreg3)
    idata = approx.sample(300, random_seed=1)
    assert idata.posterior["w"].shape == (1, 300, 3)
    assert set(map(tuple, idata.posterior["w"].values[0])) <= set(map(tuple, approx.histogram))


def test_asvgd_recovers_the_exact_posterior(linreg3):
    inf = dv.ASVGD(model=linreg3.factory, data=linreg3.data, random_seed=2)
    assert inf.approx.groups[0].vfam == "full_rank"
    inf.fit(1500, obj_optimizer=dv.adam(learning_rate=schedule(1500)), progressbar=False)
    check_posterior(inf.approx, linreg3)


def test_svgd_particles_carry_the_posterior_correlation():
    lr = LinearRegression(n_rows=200, n_coef=2, correlated=True, seed=3)
    exact = lr.cov[0, 1] / np.sqrt(lr.cov[0, 0] * lr.cov[1, 1])
    assert exact < -0.5  # a strongly correlated target
    inf = dv.SVGD(n_particles=200, model=lr.factory, data=lr.data, random_seed=4)
    inf.fit(1500, obj_optimizer=dv.adam(learning_rate=schedule(1500)), progressbar=False)
    got = np.corrcoef(inf.approx.histogram, rowvar=False)[0, 1]
    assert abs(got - exact) < 0.1, (got, exact)


def test_minibatch_svgd_lands_where_full_data_svgd_lands():
    # tolerance: means within 0.3 posterior sd of the full-data particles' means, sds within
    # 25 % (the minibatch gradient's noise stays in the last iterate)
    lr = LinearRegression(n_rows=2000, n_coef=3, seed=8)
    kw = dict(n_particles=100, model=lr.factory, data=lr.data, random_seed=5)
    opt = dict(obj_optimizer=dv.adam(learning_rate=schedule(1500, end=5e-4)), progressbar=False)
    full = dv.SVGD(**kw)
    full.fit(1500, **opt)
    mini = dv.SVGD(batch_size=200, **kw)
    mini.fit(1500, **opt)
    sd = np.sqrt(np.diag(lr.cov))
    assert np.all(np.abs(mini.approx.mean - full.approx.mean) < 0.3 * sd)
    np.testing.assert_allclose(mini.approx.std, full.approx.std, rtol=0.25)


def short_svgd(lr, n=40, **kw):
    kw = dict(dict(n_particles=30, model=lr.factory, data=lr.data, random_seed=11, batch_size=50,
                   num_workers=2, backend="local"), **kw)
    inf = dv.SVGD(**kw)
    with inf:
        inf.fit(n, obj_optimizer=dv.adam(learning_rate=0.05), progressbar=False, score=True)
    return inf


@pytest.fixture(scope="module")
def short_local(linreg3):
    return short_svgd(linreg3, shard_kernel_above=float("inf"))


def test_same_seed_same_particles_and_other_seed_differs(linreg3, short_local):
    again = short_svgd(linreg3, shard_kernel_above=float("inf"))
    np.testing.assert_array_equal(again.approx.histogram, short_local.approx.histogram)
    np.testing.assert_array_equal(again.hist, short_local.hist)
    other = short_svgd(linreg3, random_seed=12, shard_kernel_above=float("inf"))
    assert not np.allclose(other.approx.histogram, short_local.approx.histogram)


def test_sharded_kernel_equals_driver_kernel(linreg3, short_local):
    sharded = short_svgd(linreg3, shard_kernel_above=0)
    assert sharded.kernel_sharded and not short_local.kernel_sharded
    np.testing.assert_allclose(sharded.approx.histogram, short_local.approx.histogram,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("threshold", [0, float("inf")])
def test_ray_svgd_equals_local(linreg3, short_local, threshold):
    remote = short_svgd(linreg3, backend="ray", shard_kernel_above=threshold)
    assert remote.kernel_sharded == (threshold == 0)
    np.testing.assert_allclose(remote.approx.histogram, short_local.approx.histogram,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(remote.hist, short_local.hist, rtol=1e-10)


def test_loss_is_recorded_only_when_asked(linreg3):
    inf = dv.SVGD(n_particles=20, model=linreg3.factory, data=linreg3.data, random_seed=1)
    inf.fit(5, progressbar=False)
    assert inf.hist.size == 0  # as PyMC: KSD has no loss
    inf.refine(3, progressbar=False)
    inf.fit(4, progressbar=False, score=True)
    # the loss is the mean negative log density of the particles before each step
    before = inf.approx.histogram
    assert inf.hist.size == 4 and np.all(np.isfinite(inf.hist))
    logp, _ = inf.approx.full_logp_and_grad(before)
    inf.fit(1, progressbar=False, score=True)
    np.testing.assert_allclose(inf.hist[-1], -logp.mean(), rtol=1e-12)


class DiesBeforeItsSteinRows(ShardActor):
    """Worker 1 dies once, between computing its distances and its rows of phi."""

    marker = ""

    def stein_rows(self, *args):
        if self.worker.rank == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().stein_rows(*args)


@pytest.mark.usefixtures("ray_cluster")
def test_a_worker_dying_inside_the_kernel_work_changes_nothing(linreg3, short_local, tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    DiesBeforeItsSteinRows.marker = str(tmp_path / "died")
    remote = short_svgd(linreg3, backend="ray", shard_kernel_above=0,
                        backend_options={"actor_class": DiesBeforeItsSteinRows, "path": "plain"})
    assert os.path.exists(DiesBeforeItsSteinRows.marker)
    np.testing.assert_allclose(remote.approx.histogram, short_local.approx.histogram,
                               rtol=1e-10, atol=1e-12)


def test_profile_reports_the_kernel_phase(linreg3):
    inf = dv.SVGD(n_particles=20, model=linreg3.factory, data=linreg3.data, random_seed=1)
    profile = inf.run_profiling(20)
    assert profile.phases["kernel"] > 0 and set(profile.phases) >= {"workers", "update"}


def test_empirical_with_size_starts_at_start_with_seeded_jitter(linreg3):
    a = dv.SVGD(n_particles=50, jitter=0.5, model=linreg3.factory, data=linreg3.data,
                start={"w": np.array([1.0, 2.0, 3.0])}, random_seed=3).approx.histogram
    b = dv.SVGD(n_particles=50, jitter=0.5, model=linreg3.factory, data=linreg3.data,
                start={"w": np.array([1.0, 2.0, 3.0])}, random_seed=3).approx.histogram
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 3)
    assert np.all(np.abs(a.mean(0) - [1, 2, 3]) < 4 * 0.5 / np.sqrt(50))
    np.testing.assert_allclose(a.std(0), 0.5, rtol=0.3)
    still = dv.SVGD(n_particles=5, jitter=0, model=linreg3.factory, data=linreg3.data).approx
    np.testing.assert_array_equal(still.histogram, np.zeros((5, 3)))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_particles": 1}, ValueError, "n_particles must be >= 2"),
    ({"n_particles": 2.5}, TypeError, "n_particles must be an int"),
    ({"jitter": -0.1}, ValueError, "jitter must be a finite number >= 0"),
    ({"jitter": "big"}, TypeError, "jitter must be a number"),
    ({"temperature": 0}, ValueError, "temperature must be a positive"),
    ({"temperature": -1.0}, ValueError, "temperature must be a positive"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a positive"),
    ({"start_sigma": {"w": 1.0}}, TypeError, "unexpected keyword argument 'start_sigma'"),
    ({"kernel": object()}, TypeError, "kernel must provide"),
    ({"estimator": dv.KL}, TypeError, "estimator must be distvi.KSD"),
    ({"shard_kernel_above": -1}, ValueError, "shard_kernel_above must be >= 0"),
])
def test_svgd_bad_input(linreg3, kwargs, error, match):
    with pytest.raises(error, match=match):
        dv.SVGD(model=linreg3.factory, data=linreg3.data, **kwargs)


def test_asvgd_refuses_start_as_pymc_does(linreg3):
    with pytest.raises(TypeError, match="unexpected keyword argument 'start'"):
        dv.ASVGD(model=linreg3.factory, data=linreg3.data, start={"w": np.zeros(3)})
    with pytest.raises(TypeError, match="unexpected keyword argument 'start'"):
        dv.fit(10, method="asvgd", model=linreg3.factory, data=linreg3.data, start={"w": np.zeros(3)})
    with pytest.raises(ValueError, match="temperature must be a positive"):
        dv.ASVGD(model=linreg3.factory, data=linreg3.data, temperature=0.0)


def test_mixed_groups_and_klqp_on_particles_are_refused(linreg3):
    mixed = dv.Approximation([dv.Group(["w"], vfam="empirical", options={"size": 5}),
                              dv.Group(None, vfam="mean_field")])
    with pytest.raises(TypeError, match="either all Empirical groups"):
        dv.ImplicitGradient(mixed, model=linreg3.factory, data=linreg3.data)
    with pytest.raises(TypeError, match="KLqp cannot fit an Empirical group"):
        dv.KLqp(dv.Empirical(size=5), model=linreg3.factory, data=linreg3.data)
    with pytest.raises(TypeError, match="do not apply to a mean_field group"):
        dv.Group(None, vfam="mean_field", options={"size": 5})
    with pytest.raises(ValueError, match="a trace or a size"):
        dv.Empirical()
    with pytest.raises(TypeError, match="use_histogram=True needs an Empirical"):
        dv.Stein(dv.MeanField())
