"""distvi.optimizers against pymc.variational.updates on the same problems."""

import subprocess
import sys

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from numpy.testing import assert_allclose

from distvi import optimizers as dopt

STEPS = 30
RNG = np.random.default_rng(20240607)
A = RNG.normal(size=(5, 3))
B = RNG.normal(size=5)
W0 = RNG.normal(size=3)
M0 = RNG.normal(size=(2, 3))

# Non-default hyperparameters for each optimizer.
HYPER = {
    "sgd": dict(learning_rate=0.05),
    "momentum": dict(learning_rate=0.02, momentum=0.8),
    "nesterov_momentum": dict(learning_rate=0.02, momentum=0.7),
    "adagrad": dict(learning_rate=0.3, epsilon=1e-4),
    "adagrad_window": dict(learning_rate=0.05, epsilon=0.01, n_win=4),
    "rmsprop": dict(learning_rate=0.01, rho=0.8, epsilon=1e-5),
    "adadelta": dict(learning_rate=0.5, rho=0.9, epsilon=1e-5),
    "adam": dict(learning_rate=0.05, beta1=0.8, beta2=0.99, epsilon=1e-7),
    "adamax": dict(learning_rate=0.05, beta1=0.85, beta2=0.995, epsilon=1e-7),
}
NAMES = list(HYPER)


def loss_of(w, m):
    return pt.sum((pt.dot(A, w) - B) ** 2) / 2 + pt.sum(pt.log(pt.cosh(m)))


def shared_params():
    return [pytensor.shared(W0.copy(), name="w"), pytensor.shared(M0.copy(), name="M")]


def run_updates(make_updates, steps=STEPS):
    """Trajectory of the params under updates built by ``make_updates(loss, params)``."""
    params = shared_params()
    step = pytensor.function([], [], updates=make_updates(loss_of(*params), params))
    trajectory = []
    for _ in range(steps):
        step()
        trajectory.append([p.get_value().copy() for p in params])
    return trajectory


def pymc_trajectory(name, **hyper):
    return run_updates(lambda loss, params: getattr(pm, name)(loss, params, **hyper))


def assert_same(actual, expected, rtol=1e-9):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for g, w in zip(got, want):
            assert np.isfinite(w).all()
            assert_allclose(g, w, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_shared_form_matches_pymc(name):
    ours = run_updates(lambda loss, params: getattr(dopt, name)(loss, params, **HYPER[name]))
    assert_same(ours, pymc_trajectory(name, **HYPER[name]))


def pure_trajectory(optimizer, lr_at):
    """Iterate the compiled pure rule, feeding params and state back by hand."""
    w, m = pt.dvector("w"), pt.dmatrix("M")
    grads = pytensor.grad(loss_of(w, m), [w, m])
    values = [W0.copy(), M0.copy()]
    state = list(optimizer.init([v.shape for v in values]))
    state_in = [pt.tensor(dtype="float64", shape=(None,) * s.ndim) for s in state]
    lr = pt.dscalar("lr")
    new_params, new_state = optimizer.update([w, m], grads, state_in, lr)
    step = pytensor.function([w, m, *state_in, lr], [*new_params, *new_state])
    trajectory = []
    for i in range(STEPS):
        out = step(*values, *state, lr_at(i))
        values, state = out[:2], out[2:]
        trajectory.append([v.copy() for v in values])
    return trajectory


@pytest.mark.parametrize("name", NAMES)
def test_pure_form_matches_pymc(name):
    optimizer = getattr(dopt, name)(**HYPER[name])
    assert isinstance(optimizer, dopt.Optimizer) and optimizer.name == name
    ours = pure_trajectory(optimizer, optimizer.learning_rate_at)
    assert_same(ours, pymc_trajectory(name, **HYPER[name]))


def test_init_state_layout():
    shapes = [(3,), (2, 3)]
    adam = dopt.adam().init(shapes)
    assert [s.shape for s in adam] == [(3,), (3,), (2, 3), (2, 3), ()]
    window = dopt.adagrad_window(n_win=4).init(shapes)
    assert [s.shape for s in window] == [(3, 4), (2, 3, 4), ()]
    assert all(s.dtype == np.float64 and not s.any() for s in adam + window)


def test_callable_form_matches_pymc_partial():
    ours, theirs = dopt.adam(learning_rate=0.05), pm.adam(learning_rate=0.05)
    assert isinstance(ours, dopt.Optimizer)
    params = shared_params()
    updates = ours(loss_of(*params), params)
    assert list(updates)[:2] == params
    assert_same(run_updates(ours), run_updates(theirs))


@pytest.mark.parametrize("name", ["apply_momentum", "apply_nesterov_momentum"])
def test_apply_momentum_matches_pymc(name):
    def make(module):
        return lambda loss, params: getattr(module, name)(
            pm.sgd(loss, params, learning_rate=0.03), momentum=0.75
        )

    assert_same(run_updates(make(dopt)), run_updates(make(pm)))


def test_apply_momentum_subset_of_params():
    def make(module):
        return lambda loss, params: module.apply_momentum(
            pm.sgd(loss, params, learning_rate=0.03), params=params[1:], momentum=0.5
        )

    assert_same(run_updates(make(dopt)), run_updates(make(pm)))


@pytest.mark.parametrize("norm_axes", [None, (1,), (0, 1)])
def test_norm_constraint_matches_pymc(norm_axes):
    x = pt.as_tensor(RNG.normal(size=(4, 6)) * 3)
    ours = dopt.norm_constraint(x, 2.5, norm_axes=norm_axes).eval()
    assert_allclose(ours, pm.norm_constraint(x, 2.5, norm_axes=norm_axes).eval(), rtol=1e-12)


def test_norm_constraint_needs_axes_for_1d():
    with pytest.raises(ValueError, match="norm_axes"):
        dopt.norm_constraint(pt.dvector(), 1.0)


def test_total_norm_constraint_matches_pymc():
    xs = [pt.as_tensor(RNG.normal(size=(3,))), pt.as_tensor(RNG.normal(size=(2, 2)))]
    ours, our_norm = dopt.total_norm_constraint(xs, 0.5, return_norm=True)
    theirs, their_norm = pm.total_norm_constraint(xs, 0.5, return_norm=True)
    assert_allclose(our_norm.eval(), their_norm.eval(), rtol=1e-12)
    for o, t in zip(ours, theirs):
        assert_allclose(o.eval(), t.eval(), rtol=1e-12)
    assert len(dopt.total_norm_constraint(xs, 0.5)) == 2


def test_schedule_in_pure_form():
    optimizer = dopt.sgd(learning_rate=lambda step: 0.1 / (1 + step))
    ours = pure_trajectory(optimizer, optimizer.learning_rate_at)
    w, m = W0.copy(), M0.copy()
    for i in range(STEPS):
        lr = 0.1 / (1 + i)
        grad_w = A.T @ (A @ w - B)
        w, m = w - lr * grad_w, m - lr * np.tanh(m)
        assert_allclose(ours[i][0], w, rtol=1e-9)
        assert_allclose(ours[i][1], m, rtol=1e-9)


@pytest.mark.parametrize("given", ["loss", "params"])
def test_only_one_of_loss_and_params(given):
    params = shared_params()
    args = (loss_of(*params), None) if given == "loss" else (None, params)
    with pytest.raises(ValueError, match="Please provide both"):
        dopt.adam(*args)


def test_non_shared_param():
    w = pt.dvector("w")
    with pytest.raises(ValueError, match="shared"):
        dopt.sgd(pt.sum(w**2), [w])


def test_wrong_length_grads():
    params = shared_params()
    with pytest.raises(ValueError, match="1 gradient expressions for 2 parameters"):
        dopt.sgd([pt.ones(3)], params)


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                   (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)]
)
def test_bad_learning_rate(bad, error):
    with pytest.raises(error, match="learning_rate"):
        dopt.adam(learning_rate=bad)


@pytest.mark.parametrize(
    "name, key, bad",
    [
        ("adam", "epsilon", 0.0),
        ("adagrad", "epsilon", -1e-6),
        ("momentum", "momentum", 1.0),
        ("nesterov_momentum", "momentum", -0.1),
        ("rmsprop", "rho", 0.0),
        ("adadelta", "rho", 1.0),
        ("adam", "beta1", 1.0),
        ("adamax", "beta2", -0.5),
        ("adagrad_window", "n_win", 0),
        ("adagrad_window", "n_win", 2.5),
    ],
)
def test_bad_hyperparameter(name, key, bad):
    with pytest.raises((ValueError, TypeError), match=key):
        getattr(dopt, name)(**{key: bad})


def test_unknown_keyword():
    with pytest.raises(TypeError, match="beta3"):
        dopt.adam(beta3=0.5)
    with pytest.raises(TypeError, match="beta3"):
        dopt.Optimizer("adam", {**dopt.adam().hyper, "beta3": 0.5})


def test_callable_learning_rate_rejected_in_shared_form():
    params = shared_params()
    with pytest.raises(TypeError, match="callable"):
        dopt.sgd(loss_of(*params), params, learning_rate=lambda step: 0.1)


def test_import_does_not_pull_heavy_dependencies():
    code = (
        "import sys, distvi.optimizers\n"
        "heavy = {'ray', 'mlflow', 'pymc'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
