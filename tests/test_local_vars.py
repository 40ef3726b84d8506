"""Local variables (``local={"a": "g"}``): a per-group effect fitted on the worker of its
group's rows, checked against the closed-form posterior of a normal-normal hierarchical
regression with known variances.

The joint posterior of (mu, b, a_1..a_G) is Gaussian with precision ``P``; the mean-field
optimum has the exact posterior means and the sds ``1 / sqrt(diag(P))``.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest

import distvi as dv
from distvi.data import DataError
from distvi.model_errors import ModelError
from distvi.optimizers import GeometricDecay

TAU, SIGMA = 0.5, 1.0


class Hier:
    """y_i ~ N(a[g_i] + b x_i, SIGMA), a_j ~ N(mu, TAU), mu, b ~ N(0, 1)."""

    def __init__(self, n_groups: int = 200, max_rows: int = 8, seed: int = 0) -> None:
        self.sigma = SIGMA
        rng = np.random.default_rng(seed)
        self.G = n_groups
        self.counts = rng.integers(1, max_rows, n_groups)
        g = np.repeat(np.arange(n_groups), self.counts)
        rng.shuffle(g)
        x = rng.normal(size=g.size)
        a = 0.3 + TAU * rng.normal(size=n_groups)
        y = a[g] + 0.7 * x + SIGMA * rng.normal(size=g.size)
        self.data = {"g": g, "x": x, "y": y}
        self.mean, self.sd = self._exact()

    def tempered(self, beta: float) -> tuple[np.ndarray, np.ndarray]:
        """The mean-field optimum of KLqp with ``beta``: the likelihood to the power 1/beta,
        a normal likelihood with sd SIGMA * sqrt(beta)."""
        self.sigma, elbo = SIGMA * np.sqrt(beta), self.best_elbo
        try:
            return self._exact()
        finally:
            self.sigma, self.best_elbo = SIGMA, elbo

    def _exact(self):
        g, x, y, G = self.data["g"], self.data["x"], self.data["y"], self.G
        SIGMA = self.sigma  # noqa: N806 (the likelihood's sd, tempered or not)
        P = np.zeros((G + 2, G + 2))
        h = np.zeros(G + 2)
        P[0, 0] = 1 + G / TAU**2
        P[1, 1] = 1 + (x**2).sum() / SIGMA**2
        P[0, 2:] = P[2:, 0] = -1 / TAU**2
        P[2:, 2:] = np.diag(1 / TAU**2 + self.counts / SIGMA**2)
        np.add.at(P[1], 2 + g, x / SIGMA**2)
        P[2:, 1] = P[1, 2:]
        np.add.at(h, 2 + g, y / SIGMA**2)
        h[1] = (x * y).sum() / SIGMA**2
        mean = np.linalg.solve(P, h)
        self.best_elbo = self._log_joint(mean) + 0.5 * (G + 2) * np.log(2 * np.pi) \
            - 0.5 * np.log(np.diag(P)).sum()
        return mean, 1 / np.sqrt(np.diag(P))

    def _log_joint(self, theta):
        """log p(y, mu, b, a) at ``theta = (mu, b, a)``."""
        from scipy.stats import norm

        g, x, y = self.data["g"], self.data["x"], self.data["y"]
        mu, b, a = theta[0], theta[1], theta[2:]
        return (norm.logpdf(mu) + norm.logpdf(b) + norm.logpdf(a, mu, TAU).sum()
                + norm.logpdf(y, a[g] + b * x, SIGMA).sum())

    def factory(self, data):
        with pm.Model(coords={"group": [f"g{j}" for j in range(self.G)]}) as m:
            mu = pm.Normal("mu", 0, 1)
            b = pm.Normal("b", 0, 1)
            a = pm.Normal("a", mu, TAU, dims="group")
            pm.Normal("y", a[data["g"]] + b * data["x"], SIGMA, observed=data["y"])
        return m


@pytest.fixture(scope="module")
def hier():
    return Hier()


# 0.05 * 0.999**t over 6,000 steps; distvi's schedule class pickles for Ray's workers
DECAYING = GeometricDecay(lr0=0.05, end=0.05 * 0.999**6000, start=0, total=6000)


def fit(h, n=6000, data=None, **kw):
    kw.setdefault("num_workers", 2)
    kw.setdefault("backend", "local")
    inf = dv.ADVI(model=h.factory, data=h.data if data is None else data, local={"a": "g"},
                  random_seed=kw.pop("seed", 1), **kw)
    approx = inf.fit(n, obj_optimizer=dv.adam(learning_rate=DECAYING), progressbar=False)
    return inf, approx


def moments(approx):
    m, s = approx.mean_data, approx.std_data
    return (np.r_[float(m["mu"]), float(m["b"]), m["a"].values],
            np.r_[float(s["mu"]), float(s["b"]), s["a"].values])


def test_full_batch_lands_on_the_mean_field_optimum(hier):
    inf, approx = fit(hier)
    mean, sd = moments(approx)
    z = (mean - hier.mean) / hier.sd
    # the last iterate of a decaying-rate fit: MC noise of a few hundredths of a posterior sd
    assert np.abs(z).max() < 0.2 and np.median(np.abs(z)) < 0.05, np.abs(z).max()
    ratio = sd / hier.sd
    assert ratio[:2].max() < 1.15 and 0.92 < ratio.min() and ratio[2:].max() < 1.08, ratio
    assert abs(np.median(ratio) - 1) < 0.03, ratio
    # the loss is minus the whole ELBO, the locals' prior and entropy included: at the
    # mean-field optimum of a Gaussian target the ELBO is log p(y, m) + D/2 log 2 pi
    # - 1/2 sum log P_kk (the log evidence less KL(q || p))
    assert abs(-inf.hist[-1000:].mean() - hier.best_elbo) < 2.0, (-inf.hist[-1000:].mean(), hier.best_elbo)


def test_a_ready_model_with_a_group_column_in_pm_data(hier):
    """``with pm.Model(): ... dv.ADVI(local={"a": "g"})``: the column is the pm.Data "g"."""
    d = hier.data
    with pm.Model(coords={"group": [f"g{j}" for j in range(hier.G)]}):
        g, x = pm.Data("g", d["g"]), pm.Data("x", d["x"])
        mu, b = pm.Normal("mu", 0, 1), pm.Normal("b", 0, 1)
        a = pm.Normal("a", mu, TAU, dims="group")
        pm.Normal("y", a[g] + b * x, SIGMA, observed=d["y"])
        inf = dv.ADVI(local={"a": "g"}, num_workers=2, backend="local", random_seed=1)
        approx = inf.fit(6000, obj_optimizer=dv.adam(learning_rate=DECAYING), progressbar=False)
    mean, sd = moments(approx)
    assert np.abs((mean - hier.mean) / hier.sd).max() < 0.2
    assert 0.92 < (sd / hier.sd).min() and (sd / hier.sd).max() < 1.15


def test_klqp_beta_weighs_the_local_priors_and_entropies_too(hier):
    """With beta = 2 the optimum is the mean-field one for the likelihood to the power 1/2."""
    inf = dv.ADVI(model=hier.factory, data=hier.data, local={"a": "g"}, num_workers=2,
                  backend="local", random_seed=1, beta=2.0)
    inf.fit(6000, obj_optimizer=dv.adam(learning_rate=DECAYING), progressbar=False)
    mean, sd = moments(inf.approx)
    exact_mean, exact_sd = hier.tempered(2.0)
    assert np.abs((mean - exact_mean) / exact_sd).max() < 0.2
    ratio = sd / exact_sd
    assert ratio[:2].max() < 1.15 and 0.92 < ratio.min() and ratio[2:].max() < 1.08, ratio
    # and not the untempered one: the groups' sds differ by up to sqrt(2)
    assert np.median(sd[2:] / hier.sd[2:]) > 1.15


def test_minibatches_land_close_to_the_optimum(hier):
    _, approx = fit(hier, batch_size=150)
    mean, sd = moments(approx)
    z = (mean - hier.mean) / hier.sd
    assert np.median(np.abs(z)) < 0.2 and np.abs(z).max() < 1.0, np.abs(z).max()
    assert abs(np.median(sd / hier.sd) - 1) < 0.1


def test_samples_carry_the_locals_with_their_coords(hier):
    inf, approx = fit(hier, n=300)
    idata = approx.sample(400, random_seed=2)  # drawn by the workers
    inf.close()  # then by the driver, from what the workers held: the same draws
    np.testing.assert_array_equal(approx.sample(400, random_seed=2).posterior["a"], idata.posterior["a"])
    a = idata.posterior["a"]
    assert a.dims == ("chain", "draw", "group") and a.shape == (1, 400, hier.G)
    assert list(a["group"].values[:2]) == ["g0", "g1"]
    mu = approx.mean_data["a"].values
    sd = approx.std_data["a"].values
    assert approx.mean_data["a"].dims == ("group",)
    # draws of N(mu, sd): their mean within 4 standard errors of mu for every group
    assert np.all(np.abs(a.mean(("chain", "draw")).values - mu) < 4 * sd / np.sqrt(400))
    trace = approx.sample(5, return_inferencedata=False)
    assert trace["a"].shape == (5, hier.G)


def test_same_seed_same_numbers_and_refine_continues_exactly(hier):
    _, one = fit(hier, n=200, batch_size=100)
    _, two = fit(hier, n=200, batch_size=100)
    np.testing.assert_array_equal(moments(one)[0], moments(two)[0])
    inf, _ = fit(hier, n=120, batch_size=100)
    inf.refine(80, progressbar=False)
    np.testing.assert_array_equal(moments(inf.approx)[0], moments(one)[0])
    np.testing.assert_array_equal(moments(inf.approx)[1], moments(one)[1])


def test_a_transformed_local_variable(hier):
    """A positive local scale per group: its draws are positive, and its sd is fitted."""
    g = hier.data["g"]

    def factory(data):
        with pm.Model() as m:
            s = pm.HalfNormal("s", 1.0, shape=hier.G)
            pm.Normal("y", 0.0, s[data["g"]], observed=data["y"])
        return m

    inf = dv.ADVI(model=factory, data=hier.data, local={"s": "g"}, num_workers=2,
                  backend="local", random_seed=1)
    approx = inf.fit(300, progressbar=False)
    draws = approx.sample(50, random_seed=1, include_transformed=True).posterior
    assert (draws["s"].values > 0).all() and draws["s_log__"].shape == (1, 50, hier.G)
    assert g.max() + 1 == hier.G


# ---------------------------------------------------------------- bad input, before any work
def _inf(h, factory=None, local=None, data=None, **kw):
    return dv.ADVI(model=factory or h.factory, data=h.data if data is None else data,
                   local={"a": "g"} if local is None else local, num_workers=kw.pop("num_workers", 2),
                   backend="local", random_seed=1, **kw)


def test_bad_local_specs_are_named(hier):
    with pytest.raises(ModelError, match=r"\['c'\] are not free variables.*'mu', 'b', 'a'"):
        _inf(hier, local={"c": "g"})
    with pytest.raises(ModelError, match="'grp' is not a data column"):
        _inf(hier, local={"a": "grp"})
    with pytest.raises(ModelError, match="column 'x' is float64.*integer group"):
        _inf(hier, local={"a": "x"})
    with pytest.raises(ModelError, match="'mu' is a scalar"):
        _inf(hier, local={"mu": "g"})
    with pytest.raises(TypeError, match="local= must map variable names"):
        _inf(hier, local=["a"])


def test_a_column_whose_values_do_not_fit_is_refused(hier):
    bad = dict(hier.data, g=hier.data["g"].copy())
    bad["g"][7] = hier.G
    with pytest.raises(DataError, match=r"1 group indices outside 0..199 \(the first 200 at row 7\)"):
        _inf(hier, data=bad)
    empty = dict(hier.data, g=np.where(hier.data["g"] == 5, 4, hier.data["g"]))
    with pytest.raises(DataError, match="1 of the 200 groups of a have no rows .*group 5"):
        _inf(hier, data=empty)
    with pytest.raises(ValueError, match="num_workers=300 is more than the 200 groups"):
        _inf(hier, num_workers=300)


def test_a_local_variable_used_other_than_by_its_column_is_refused(hier):
    def summed(data):
        with pm.Model() as m:
            a = pm.Normal("a", 0, 1, shape=hier.G)
            pm.Normal("y", a.sum() + data["x"], 1.0, observed=data["y"])
        return m

    def other_index(data):
        with pm.Model() as m:
            a = pm.Normal("a", 0, 1, shape=hier.G)
            pm.Normal("y", a[data["h"]], 1.0, observed=data["y"])
        return m

    def per_group_prior(data):
        with pm.Model() as m:
            a = pm.Normal("a", np.linspace(0, 1, hier.G), 1.0, shape=hier.G)
            pm.Normal("y", a[data["g"]], 1.0, observed=data["y"])
        return m

    def nested(data):
        with pm.Model() as m:
            a = pm.Normal("a", 0, 1, shape=hier.G)
            c = pm.Normal("c", a, 1.0, shape=hier.G)  # its prior reads a's groups
            pm.Normal("y", c[data["g"]] + a[data["g"]], 1.0, observed=data["y"])
        return m

    with pytest.raises(ModelError, match="not indexed by data\\['g'\\]"):
        _inf(hier, factory=summed)
    with pytest.raises(ModelError, match=r"read local variables \['a'\] other than at their rows"):
        _inf(hier, factory=nested, local={"c": "g", "a": "g"})
    with pytest.raises(ModelError, match="'c' has parameters that differ by group"):
        _inf(hier, factory=nested, local={"c": "g"})  # a global with one entry per group
    with pytest.raises(ModelError, match="indexed in the likelihood by something other than data\\['g'\\]"):
        _inf(hier, factory=other_index, data=dict(hier.data, h=hier.data["g"].copy()))
    with pytest.raises(ModelError, match="parameters that differ by group"):
        _inf(hier, factory=per_group_prior)


def test_fit_settings_not_built_for_locals_are_refused_before_work(hier, tmp_path):
    inf = _inf(hier)
    for kw, what in [({"n": None, "store": str(tmp_path / "r.zarr")}, "n=None"),
                     ({"average_from": 0.5}, "average_from=")]:
        kw = {"n": 10, **kw}
        with pytest.raises(ValueError, match=f"not supported yet: {what}"):
            inf.fit(progressbar=False, **kw)
    assert not (tmp_path / "r.zarr").exists() and inf.state is None
    with pytest.raises(ValueError, match="adagrad_window keeps one window position"):
        inf.fit(5, obj_optimizer=dv.adagrad_window(), progressbar=False)
    svgd = dv.SVGD(n_particles=5, model=hier.factory, data=hier.data, local={"a": "g"},
                   num_workers=2, backend="local")
    with pytest.raises(ValueError, match="fitted by a KL method"):
        svgd.fit(5, progressbar=False)
    inf.fit(5, progressbar=False)
    with pytest.raises(ValueError, match="PSIS with local variables"):
        inf.approx.diagnose(100)


def test_local_draws_over_the_limit_are_refused_and_left_out_of_a_store(hier, tmp_path, monkeypatch):
    from distvi import results

    from distvi import local_worker

    monkeypatch.setattr(results, "LOCAL_DRAWS_MAX_MB", 0.5)  # 1000 draws x 200 groups: 1.5 MB
    monkeypatch.setattr(local_worker, "DRAW_BLOCK_MB", 0.1)  # the workers write 8 blocks each
    store = str(tmp_path / "run.zarr")
    inf = _inf(hier, batch_size=100)
    with pytest.warns(UserWarning, match=r"posterior draws leave out the local variables \(1000 "
                                         r"draws of local variables \['a'\] take 2 MB.*the "
                                         "workers write 1000 draws of them into its local_draws/"):
        inf.fit(30, store=store, progressbar=False)
    run = dv.open_run(store)
    assert run.status == "finished" and "a" not in run.posterior().posterior
    assert run.checkpoint.step == 30
    # the workers' draws: the same as those the driver would gather (the same streams)
    written = run.local_draws("a")
    assert written.shape == (1000, hier.G, 1)
    monkeypatch.setattr(results, "LOCAL_DRAWS_MAX_MB", 1024)
    gathered = inf.shards.local_draws(1000, inf.random_seed)[0]
    np.testing.assert_array_equal(written, gathered)
    monkeypatch.setattr(results, "LOCAL_DRAWS_MAX_MB", 0.5)
    with pytest.raises(results.LocalDrawsTooLarge, match=r"include_locals=False.*the run store "
                                                         r".* holds draws of them the workers wrote"):
        inf.approx.sample(1000)
    assert "a" not in inf.approx.sample(1000, include_locals=False).posterior
    assert inf.approx.sample(100).posterior["a"].shape == (1, 100, hier.G)


def test_a_local_update_that_is_not_finite_stops_the_fit_saying_so(hier):
    inf = _inf(hier)
    with pytest.raises(FloatingPointError, match=r"step 0: the update of the local variables of "
                                                 r"shard \d is not finite \(\d+ values\)"):
        inf.fit(5, obj_optimizer=dv.sgd(learning_rate=1e308), progressbar=False)


def test_resume_from_a_run_store_is_exact(hier, tmp_path):
    """A run stopped after 120 steps (checkpoints every 40, each with the workers' local
    state) and resumed to 200 equals 200 steps in one go, bit for bit."""
    store = str(tmp_path / "run.zarr")
    opt = dv.adam(learning_rate=0.02)
    first = _inf(hier, batch_size=100)
    first.fit(120, obj_optimizer=opt, store=store, checkpoint_every=40, progressbar=False)
    assert dv.open_run(store).checkpoint.step == 120
    again = _inf(hier, batch_size=100)
    again.fit(200, obj_optimizer=opt, store=store, resume=True, progressbar=False)
    whole = _inf(hier, batch_size=100)
    whole.fit(200, obj_optimizer=opt, progressbar=False)
    for a, b in zip(moments(whole.approx), moments(again.approx)):
        np.testing.assert_array_equal(a, b)
    run = dv.open_run(store)
    assert run.status == "finished" and run.posterior().posterior["a"].shape[-1] == hier.G
    with pytest.raises(dv.store.StoreError, match=r"written for other data: shards \[\[0, 419\]"):
        _inf(hier, batch_size=100, num_workers=3).fit(300, obj_optimizer=opt, store=store,
                                                      resume=True, progressbar=False)


def test_a_tracked_run_with_locals_is_in_mlflow_and_the_store(hier, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = dv.MLflowTracking(experiment="locals", tracking_uri=uri, log_every=20)
    inf = _inf(hier, batch_size=100)
    inf.fit(60, store=str(tmp_path / "run.zarr"), tracking=tracker, progressbar=False)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["inference.local.a"] == "g"
    losses = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
    np.testing.assert_array_equal([m.value for m in losses], inf.hist[[19, 39, 59]])


def test_a_zarr_store_ordered_by_the_column_is_split_where_it_lies(hier, tmp_path):
    """Each worker reads its own range of whole groups from the store: the same numbers as
    the rows given in memory (which are ordered the same way)."""
    from conftest import write_zarr

    order = np.argsort(hier.data["g"], kind="stable")
    write_zarr(tmp_path / "d.zarr", {k: v[order] for k, v in hier.data.items()}, chunk_rows=64)
    source = dv.data.ZarrSource(str(tmp_path / "d.zarr"))
    _, memory = fit(hier, n=100, batch_size=100)
    inf, zarr = fit(hier, n=100, batch_size=100, data=source)
    assert inf.source.source is source  # the rows stay in the store
    for a, b in zip(moments(memory), moments(zarr)):
        np.testing.assert_array_equal(a, b)
    write_zarr(tmp_path / "shuffled.zarr", hier.data)
    with pytest.raises(DataError, match=r"not ordered by column 'g' \(row \d+ has group"):
        _inf(hier, data=dv.data.ZarrSource(str(tmp_path / "shuffled.zarr")))


# ---------------------------------------------------------------- on Ray
@pytest.mark.parametrize("path, in_store", [("plain", False), ("direct", True)])
def test_ray_equals_local_bit_for_bit(hier, ray_cluster, path, in_store, tmp_path):
    """(Over the direct path the workers read their groups' rows from a Zarr store.)"""
    from conftest import write_zarr

    data = None
    if in_store:
        order = np.argsort(hier.data["g"], kind="stable")
        data = dv.data.ZarrSource(write_zarr(tmp_path / "d.zarr", {k: v[order] for k, v in hier.data.items()}))
    _, local = fit(hier, n=150, batch_size=100)
    inf, ray = fit(hier, n=100, batch_size=100, backend="ray", backend_options={"path": path}, data=data)
    with inf:  # refine on the same workers: they kept their groups' parameters
        inf.refine(50, progressbar=False)
    for a, b in zip(moments(local), moments(inf.approx)):
        np.testing.assert_array_equal(a, b)


def test_killed_workers_holding_locals_change_nothing(hier, ray_cluster, monkeypatch):
    """Workers killed mid-fit (one between snapshots, one after a later snapshot) are rebuilt
    from their snapshot and the steps since: the fit equals an uninterrupted one bit for bit."""
    import os
    import signal

    from distvi.backends import ray_locals

    monkeypatch.setattr(ray_locals, "SNAPSHOT_EVERY", 16)  # snapshots at steps 0, 16, 32, 48
    killed = []

    def kill(approx, losses, i):
        if i in (20, 45):
            pid = inf.shards.backend.pids()[i % 2]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    _, local = fit(hier, n=60, batch_size=100)
    inf = dv.ADVI(model=hier.factory, data=hier.data, local={"a": "g"}, batch_size=100,
                  num_workers=2, backend="ray", random_seed=1)
    with inf:
        inf.fit(60, obj_optimizer=dv.adam(learning_rate=DECAYING), callbacks=[kill],
                progressbar=False)
        assert len(killed) == 2 and not set(killed) & set(inf.shards.backend.pids())
    for a, b in zip(moments(local), moments(inf.approx)):
        np.testing.assert_array_equal(a, b)


def test_a_pickled_approximation_keeps_the_locals(hier):
    import cloudpickle  # the factory is a closure, as a user's often is

    inf, approx = fit(hier, n=50)
    again = cloudpickle.loads(cloudpickle.dumps(approx))
    np.testing.assert_array_equal(again.mean_data["a"].values, approx.mean_data["a"].values)
    np.testing.assert_array_equal(again.std_data["a"].values, approx.std_data["a"].values)


# ---------------------------------------------------------------- a latent value per row
def test_a_variable_sized_by_the_rows_is_a_per_row_local_on_its_closed_form():
    """z_i ~ N(mu, S_Z), y_i ~ N(z_i, S_Y), mu ~ N(0, 1): Gaussian posterior in closed form."""
    rng = np.random.default_rng(3)
    n, s_z, s_y = 600, 1.0, 0.5
    y = 0.7 + s_z * rng.normal(size=n) + s_y * rng.normal(size=n)

    def factory(data):
        with pm.Model() as m:
            mu = pm.Normal("mu", 0, 1)
            z = pm.Normal("z", mu, s_z, shape=data["y"].shape[0])
            pm.Normal("y", z, s_y, observed=data["y"])
        return m

    P = np.zeros((n + 1, n + 1))
    P[0, 0] = 1 + n / s_z**2
    P[0, 1:] = P[1:, 0] = -1 / s_z**2
    P[1:, 1:] = np.diag(np.full(n, 1 / s_z**2 + 1 / s_y**2))
    mean = np.linalg.solve(P, np.r_[0.0, y / s_y**2])
    sd = 1 / np.sqrt(np.diag(P))
    inf = dv.ADVI(model=factory, data={"y": y}, num_workers=2, backend="local", random_seed=1)
    approx = inf.fit(6000, obj_optimizer=dv.adam(learning_rate=DECAYING), progressbar=False)
    m, s = approx.mean_data, approx.std_data
    got_mean = np.r_[float(m["mu"]), m["z"].values]
    got_sd = np.r_[float(s["mu"]), s["z"].values]
    assert np.abs((got_mean - mean) / sd).max() < 0.15
    assert 0.93 < (got_sd / sd).min() and (got_sd / sd).max() < 1.07
    draws = approx.sample(20, random_seed=1).posterior["z"]
    assert draws.shape == (1, 20, n)  # in the rows' own order
    assert np.corrcoef(m["z"].values, y)[0, 1] > 0.95


def test_a_per_row_variable_named_in_local_or_with_a_group_local_is_refused(hier):
    def both(data):
        with pm.Model() as m:
            a = pm.Normal("a", 0, 1, shape=hier.G)
            z = pm.Normal("z", 0, 1, shape=data["y"].shape[0])
            pm.Normal("y", a[data["g"]] + z, 1.0, observed=data["y"])
        return m

    with pytest.raises(ModelError, match="'z' is sized by the rows: it is a local variable of its rows"):
        _inf(hier, factory=both, local={"z": "g"})
    with pytest.raises(ValueError, match=r"different columns \['the rows \(a per-row variable\)', 'g'\]"):
        _inf(hier, factory=both)
