"""distvi links the bundled OpenBLAS into its own compiled functions, and only into those."""

import numpy as np
import pymc as pm
import pytensor
import pytest

import distvi as dv
from distvi import _compile
from distvi.model import adapt


def _factory(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=4)
        pm.Bernoulli("y", logit_p=data["X"] @ w, observed=data["y"])
    return m


def _data_term(monkeypatch, blas: str, n_points: int):
    monkeypatch.setenv("DISTVI_BLAS", blas)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    y = rng.integers(0, 2, size=300)
    adapter, _ = adapt(_factory, {"X": X, "y": y})
    return adapter.data_term().compile(n_points), X, y


def _ops(fn) -> set[str]:
    return {type(node.op).__name__ for node in fn.maker.fgraph.apply_nodes}


@pytest.mark.parametrize("n_points", [1, 3])
def test_data_term_uses_c_blas_and_matches_the_unlinked_one(monkeypatch, n_points):
    pytest.importorskip("scipy_openblas32")
    before = pytensor.config.blas__ldflags
    linked, X, y = _data_term(monkeypatch, "auto", n_points)
    plain, _, _ = _data_term(monkeypatch, "off", n_points)
    if n_points == 1:  # matrix-vector products: the C op when linked, NumPy's otherwise
        assert "CGemv" in _ops(linked) and "Gemv" in _ops(plain) and "CGemv" not in _ops(plain)
    points = np.random.default_rng(1).normal(size=(n_points, 4))
    scale = np.array(2.0)
    a, b = linked(points, X, y, scale), plain(points, X, y, scale)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-12)
    # the user's global setting is untouched: PyMC's own functions compile as before
    assert pytensor.config.blas__ldflags == before


def test_a_blas_the_user_configured_is_used_as_it_is(monkeypatch):
    monkeypatch.setenv("DISTVI_BLAS", "auto")
    with pytensor.config.change_flags(blas__ldflags="-lmyblas"):
        assert _compile.blas_flags() == "-lmyblas"
    assert _compile.blas_flags() in ("", _compile._bundled_flags())


def test_blas_linking_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DISTVI_BLAS", "off")
    assert _compile.blas_flags() == ""


def test_fit_with_and_without_the_linked_blas_agree(monkeypatch):
    pytest.importorskip("scipy_openblas32")
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 4))
    y = rng.integers(0, 2, size=400)
    means = []
    for blas in ("auto", "off"):
        monkeypatch.setenv("DISTVI_BLAS", blas)
        with dv.FullRankADVI(model=_factory, data={"X": X, "y": y}, batch_size=100,
                             random_seed=3) as inference:
            approx = inference.fit(200, progressbar=False, obj_optimizer=dv.adam(learning_rate=0.01))
            means.append((approx.mean, approx.cov, inference.hist))
    for a, b in zip(*means):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_bundled_blas_runs_on_one_thread(monkeypatch):
    pytest.importorskip("scipy_openblas32")
    from threadpoolctl import threadpool_info

    _data_term(monkeypatch, "auto", 1)
    bundled = [i for i in threadpool_info() if i["filepath"].endswith("libscipy_openblas.so")]
    assert bundled and all(i["num_threads"] == 1 for i in bundled)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("DISTVI_BLAS_THREADS", value)
    with pytest.raises(ValueError, match="DISTVI_BLAS_THREADS must be an integer >= 1"):
        _compile.blas_threads()

