"""Configs that fit until converged (n: null / auto, max_n, tol) and set the start (start: map,
start values, start_sigma): each key reaches the fit, each bad value is refused naming it."""

import re

import numpy as np
import pytest

from conftest import write_config

import distvi as dv
from distvi.cli import main, run_config
from distvi.config import ConfigError, load

BASE = {
    "model": "jobs.quickstart:model",
    "data": {"kind": "loader", "loader": "jobs.quickstart:load", "options": {"rows": 300}},
    "method": "advi",
    "n": None,
    "max_n": 3000,
    "tol": 0.3,
    "backend": "local",
    "seed": 4,
    "progress": "off",
}


pytestmark = pytest.mark.usefixtures("at_repo_root")  # configs name jobs.* from the root


write = write_config  # a config file in tmp_path


@pytest.fixture
def fits(monkeypatch):
    """The Inference and the arguments of every fit a config starts (no step is run)."""
    seen = []

    def fake_fit(self, n=10000, **kwargs):
        seen.append((self, n, kwargs))
        return self.approx

    monkeypatch.setattr(dv.Inference, "fit", fake_fit)
    return seen


@pytest.mark.parametrize("given, n, until", [
    ({"n": None}, None, {"max_n": 3000, "tol": 0.3}),
    ({"n": "auto"}, None, {"max_n": 3000, "tol": 0.3}),
    ({"n": "auto", "max_n": None, "tol": None}, None, {}),  # the library's defaults
    ({"n": 50, "max_n": None, "tol": None}, 50, {}),
])
def test_n_max_n_and_tol_reach_the_fit(tmp_path, fits, given, n, until):
    cfg = load(write(tmp_path, {**BASE, **given}))
    run_config(cfg)
    (_, got_n, kwargs), = fits
    assert got_n == n
    assert {k: kwargs[k] for k in ("max_n", "tol") if k in kwargs} == until
    lr = kwargs["obj_optimizer"].hyper["learning_rate"]
    assert lr == (0.1 if n is None else 0.01)  # fit(n=None)'s default rate without an optimizer


def test_start_and_start_sigma_reach_the_approximation(tmp_path, fits):
    run_config(load(write(tmp_path, {**BASE, "start": "map"})))
    run_config(load(write(tmp_path, {**BASE, "start": {"intercept": 0.5, "beta": [0, 1, 0, 0, 0, 0, 0]},
                                     "start_sigma": {"beta": 0.25}})))
    run_config(load(write(tmp_path, {**BASE, "method": "fullrank_advi", "start_sigma": {"intercept": 2}})))
    (a, *_), (b, *_), (c, *_) = fits
    assert a.approx.groups[0].start == "map"
    group = b.approx.groups[0]
    assert group.start == {"intercept": 0.5, "beta": [0, 1, 0, 0, 0, 0, 0]}
    np.testing.assert_allclose(b.approx.mean, [0.5, 0, 1, 0, 0, 0, 0, 0])  # intercept first
    np.testing.assert_allclose(b.approx.std[1:], 0.25)
    assert c.approx.groups[0].vfam == "full_rank" and c.approx.std[0] == pytest.approx(2.0)


def test_a_config_fitted_until_converged_from_map_records_it(tmp_path, capsys):
    store = tmp_path / "conv.zarr"
    cfg = {**BASE, "start": "map", "store": str(store)}
    assert main(["run", write(tmp_path, cfg)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"with advi: \d+ steps in \d+\.\d s; converged in \d+ phase", out), out
    rs = dv.store.RunStore.open(str(store))
    attrs = rs.attrs
    assert attrs["start"]["method"] == "map" and attrs["start"]["gradient_evaluations"] > 0
    conv = attrs["convergence"]
    assert conv["converged"] and conv["tol"] == 0.3 and conv["max_n"] == 3000
    fit = attrs["config"]["fit"]
    assert fit["n"] is None and fit["max_n"] == 3000 and fit["tol"] == 0.3
    # a run fitted until converged is resumed only for a fixed number of steps
    assert main(["resume", str(store)]) == 2
    assert "fitted until converged (n: null)" in capsys.readouterr().err


def test_start_values_and_sds_reach_a_real_fit(tmp_path):
    cfg = load(write(tmp_path, {**BASE, "n": "auto", "max_n": 2500, "tol": 0.5,
                                "start": {"intercept": -0.7}, "start_sigma": {"beta": 0.2}}))
    inference = run_config(cfg)
    assert inference.start_report is None  # a start of its own: no start="map"
    conv = inference.convergence
    assert conv.converged and conv.max_n == 2500 and conv.tol == 0.5
    assert inference.approx.fit_info["steps"] == conv.step <= 2500


@pytest.mark.parametrize("change, match", [
    ({"n": "sometimes"}, r"n must be an int \(the number of steps\), or null or auto .*got str 'sometimes'"),
    ({"n": True}, r"n must be an int .*got bool True"),
    ({"n": 0}, r"n must be >= 1"),
    ({"n": 100}, r"max_n applies to a fit run until it converges: set n: null"),
    ({"n": 100, "max_n": None}, r"tol applies to a fit run until it converges"),
    ({"max_n": 0}, r"max_n must be >= 1"),
    ({"max_n": 10**12}, r"max_n must be <= "),
    ({"max_n": "lots"}, r"max_n must be an int or null"),
    ({"tol": 0}, r"tol must be a number in \(0, 1\)"),
    ({"tol": 1.5}, r"tol must be a number in \(0, 1\)"),
    ({"tol": True}, r"tol must be an int or a number or null, got bool"),
    ({"average_from": 0.5}, r"average_from is for a fixed n: .*drop average_from"),
    ({"optimizer": {"name": "adam", "decay": {"to": 0.001}}}, r"optimizer.decay is a learning-rate schedule"),
    ({"start": "mode"}, r"start must be map or a mapping of variable names"),
    ({"start": 3}, r"start must be a string or a mapping or null, got int 3"),
    ({"start": {"beta": "x"}}, r"start.beta must be a number or a list of numbers, got 'x'"),
    ({"start": {"beta": [1, float("nan")]}}, r"start.beta must be a number or a list of numbers"),
    ({"start": {"beta": []}}, r"start.beta must be a number or a list of numbers"),
    ({"start": {"gamma": 1.0}}, r"start.gamma: 'gamma' is not a free variable of the model; known: "),
    ({"start": {"beta": [1.0, 2.0]}}, r"start.beta must be one value or an array of the variable's shape \[7\]"),
    ({"start_sigma": {"beta": -1}}, r"start_sigma.beta must be a number > 0"),
    ({"start_sigma": {"beta": [1, 0]}}, r"start_sigma.beta must be a number > 0"),
    ({"start_sigma": "map"}, r"start_sigma must be a mapping or null, got str"),
    ({"start_sigma": {"sigma": 1}}, r"start_sigma.sigma: 'sigma' is not a free variable"),
    ({"start_sigma": {"intercept": [1, 1]}}, r"start_sigma.intercept must be one value or an array .*shape \[\]"),
    ({"method": "svgd", "start_sigma": {"beta": 1}}, r"start_sigma applies to advi and fullrank_advi, not svgd"),
    ({"method": "asvgd", "start": "map"}, r"start does not apply to method asvgd"),
])
def test_bad_values_are_refused_naming_the_key_before_any_work(tmp_path, capsys, change, match):
    store = tmp_path / "never.zarr"
    assert main(["run", write(tmp_path, {**BASE, "store": str(store), **change})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distvi: error: ") and re.search(match, err), err
    assert not store.exists()


def test_overrides_take_null_and_auto(tmp_path):
    path = write(tmp_path, {k: v for k, v in BASE.items() if k not in ("n", "max_n", "tol")})
    assert load(path)["n"] == 10_000
    assert load(path, ["n=null"])["n"] is None and load(path, ["n=auto"])["n"] is None
    with pytest.raises(ConfigError, match="max_n applies to a fit run until it converges"):
        load(path, ["max_n=10"])
