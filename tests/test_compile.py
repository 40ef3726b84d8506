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


def _scalar_ops(fn) -> list[str]:
    """The scalar ops inside every elementwise node of a compiled function (fused or not)."""
    from pytensor.scalar.basic import Composite
    from pytensor.tensor.elemwise import Elemwise

    names = []
    for node in fn.maker.fgraph.apply_nodes:
        if isinstance(node.op, Elemwise):
            op = node.op.scalar_op
            inner = op.fgraph.apply_nodes if isinstance(op, Composite) else [node]
            names += [type(n.op.scalar_op if isinstance(n.op, Elemwise) else n.op).__name__ for n in inner]
    return names


def test_the_exact_rewrites_change_no_value_and_halve_the_softplus_work():
    """distvi's rewrites (one softplus per Bernoulli row, the sigmoid bound checks without an
    exponential) give the same log density and gradient as PyMC's own compile, bit for bit,
    at every kind of double, and run only where distvi compiles."""
    import pytensor.tensor as pt

    x = pt.vector("x")
    y = pt.vector("y", dtype="int64")
    logp = pm.logp(pm.Bernoulli.dist(logit_p=x), y).sum()
    outs = [logp, pt.grad(logp, x)]
    ours = _compile.function([x, y], outs, mode=_compile.compile_mode(True))
    plain = pytensor.function([x, y], outs, mode=pytensor.compile.mode.get_mode(None).including(
        "local_check_parameter_to_ninf_switch"))
    rng = np.random.default_rng(3)
    xs = np.concatenate([rng.normal(scale=30, size=2000), [0.0, -0.0, 40.0, -40.0, 700.0, -745.0]])
    ys = rng.integers(0, 2, size=xs.size)
    for a, b in zip(ours(xs, ys), plain(xs, ys)):
        np.testing.assert_array_equal(a, b)
    for bad in (np.inf, -np.inf, np.nan):  # the bound check's truth value, exactly as PyMC's
        xb = xs.copy()
        xb[5] = bad
        for a, b in zip(ours(xb, ys), plain(xb, ys)):
            np.testing.assert_array_equal(a, b)
    assert _scalar_ops(ours).count("Softplus") < _scalar_ops(plain).count("Softplus")
    assert _scalar_ops(ours).count("Sigmoid") < _scalar_ops(plain).count("Sigmoid")
