"""Golden results: short fixed-seed fits whose loss traces and final parameters must stay
bit-identical across refactors of the driver.

``python tests/golden/golden.py --write`` records ``golden.json`` and the environment it was
recorded in, ``environment.json`` (run it only when a change of numbers is intended and said,
or to re-record the unchanged code in a new environment). ``tests/test_golden.py`` reruns every
case: in the recording's environment it compares with ``==``; elsewhere (other versions of
the numerical packages, another CPU's vector instructions) the last bits of a sum or an
``exp`` may differ, and it compares within :data:`ELSEWHERE_RTOL`.
Each case returns ``(hist, params)``: the loss trace and the final variational parameters.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pymc as pm

import distvi as dv
from distvi.optimizers import GeometricDecay

HERE = Path(__file__).parent
GOLDEN = HERE / "golden.json"
ENVIRONMENT = HERE / "environment.json"
ELSEWHERE_RTOL = 1e-12  # outside the recording's environment: rounding, not a change of method
PACKAGES = ("numpy", "scipy", "scipy-openblas32", "pytensor", "pymc", "ray")


def environment() -> dict:
    """What the bits of a fit depend on beyond distvi: Python, the numerical packages'
    versions, the machine, its CPU's model and vector instructions. The model counts on its
    own: OpenBLAS picks its kernels by CPU model, and two CPUs with the same vector
    instructions (measured: an AMD EPYC against the machine of the recording) differ in
    the last bit of a fit."""
    import platform
    from importlib.metadata import version

    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu": model,
            "packages": {p: version(p) for p in PACKAGES},
            "vector": sorted(f for f in flags if f.startswith(("avx", "fma", "sse4")))}


def _linreg(n_rows=240, n_coef=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, n_coef))
    y = X @ rng.normal(size=n_coef) + rng.normal(size=n_rows)
    return {"X": X, "y": y}


DATA = _linreg()


def linreg(data):
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
    return m


def scaled(data):  # a transformed variable and two free variables
    with pm.Model() as m:
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        s = pm.HalfNormal("s", 1.0)
        pm.Normal("y", data["X"] @ w, s, observed=data["y"])
    return m


def split(data):  # for two groups
    with pm.Model() as m:
        a = pm.Normal("a", 0.0, 1.0, shape=2)
        b = pm.Normal("b", 0.0, 1.0)
        w = pm.math.concatenate([a, b[None]])
        pm.Normal("y", data["X"] @ w, 1.0, observed=data["y"])
    return m


def _out(inf):
    return inf.hist, inf.approx.params_values


def _fit(inf, n, **kw):
    kw.setdefault("obj_optimizer", dv.adam(learning_rate=0.02))
    with inf:
        inf.fit(n, progressbar=False, score=True, **kw)
    return _out(inf)


def advi():
    return _fit(dv.ADVI(model=linreg, data=DATA, batch_size=40, random_seed=1), 150)


def advi_four_shards():
    return _fit(dv.ADVI(model=scaled, data=DATA, batch_size=15, num_workers=4, backend="local",
                        random_seed=2), 150)


def fullrank():
    return _fit(dv.FullRankADVI(model=scaled, data=DATA, batch_size=40, random_seed=3), 150)


def fullrank_nmc_clip():
    return _fit(dv.FullRankADVI(model=linreg, data=DATA, batch_size=40, random_seed=4), 120,
                obj_n_mc=4, total_grad_norm_constraint=5.0)


def two_groups():
    approx = dv.Approximation([dv.Group(["a"], vfam="full_rank"), dv.Group(None, vfam="mean_field")])
    return _fit(dv.KLqp(approx, model=split, data=DATA, random_seed=5, stl=True, batch_size=60),
                120, obj_n_mc=2)


def klqp_beta():
    return _fit(dv.KLqp(dv.MeanField(), model=linreg, data=DATA, beta=0.5, random_seed=6,
                        batch_size=40), 100)


def svgd():
    return _fit(dv.SVGD(n_particles=12, model=scaled, data=DATA, batch_size=40, random_seed=7), 80)


def asvgd():
    return _fit(dv.ASVGD(model=linreg, data=DATA, batch_size=40, random_seed=8), 80)


def minibatch():
    with pm.Model() as m:
        Xm, ym = pm.Minibatch(DATA["X"], DATA["y"], batch_size=30)
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", Xm @ w, 1.0, observed=ym, total_size=len(DATA["y"]))
    with m:
        return _fit(dv.ADVI(num_workers=3, backend="local", random_seed=9), 120)


def averaging():
    return _fit(dv.ADVI(model=linreg, data=DATA, batch_size=40, random_seed=10), 150,
                average_from=0.5)


def schedule():
    return _fit(dv.FullRankADVI(model=linreg, data=DATA, batch_size=40, random_seed=11), 150,
                obj_optimizer=dv.adam(learning_rate=GeometricDecay(0.05, 0.005, 0, 150)))


def other_optimizers():
    hist, params = [], []
    for opt in (dv.sgd(learning_rate=1e-3), dv.momentum(learning_rate=1e-3),
                dv.adagrad_window(learning_rate=0.05), dv.rmsprop(learning_rate=0.01),
                dv.adamax(learning_rate=0.02)):
        h, p = _fit(dv.ADVI(model=linreg, data=DATA, batch_size=40, random_seed=12), 40,
                    obj_optimizer=opt)
        hist.append(h)
        params.extend(p)
    return np.concatenate(hist), params


def refine():
    inf = dv.ADVI(model=linreg, data=DATA, batch_size=40, random_seed=13)
    with inf:
        inf.fit(60, progressbar=False, obj_optimizer=dv.adam(learning_rate=0.02))
        inf.refine(60, progressbar=False)
    return _out(inf)


def resume():
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "run.zarr"

        def make():
            return dv.FullRankADVI(model=linreg, data=DATA, batch_size=40, num_workers=2,
                                   backend="local",
                                   random_seed=14)

        _fit(make(), 60, store=store, checkpoint_every=30)
        return _fit(make(), 120, store=store, resume=True)


def ray_advi():
    return _fit(dv.ADVI(model=scaled, data=DATA, batch_size=20, num_workers=2, backend="ray",
                        random_seed=15), 60)


def ray_svgd():
    return _fit(dv.SVGD(n_particles=10, model=linreg, data=DATA, batch_size=20, num_workers=2,
                        backend="ray", random_seed=16), 40)


def fit_function():
    with pm.Model():
        w = pm.Normal("w", 0.0, 1.0, shape=3)
        pm.Normal("y", pm.math.dot(DATA["X"], w), 1.0, observed=DATA["y"])
        inf = dv.FullRankADVI(random_seed=17)
        approx = dv.fit(100, method=inf, progressbar=False,
                        obj_optimizer=dv.adam(learning_rate=0.02))
    return inf.hist, approx.params_values


CASES = [advi, advi_four_shards, fullrank, fullrank_nmc_clip, two_groups, klqp_beta, svgd, asvgd,
         minibatch, averaging, schedule, other_optimizers, refine, resume, ray_advi, ray_svgd,
         fit_function]


def as_json(hist, params) -> dict:
    return {"hist": [float(v) for v in np.asarray(hist, dtype="float64").ravel()],
            "params": [{"shape": list(np.shape(p)),
                        "values": [float(v) for v in np.asarray(p, dtype="float64").ravel()]}
                       for p in params]}


def run(case) -> dict:
    return as_json(*case())


if __name__ == "__main__":
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {case.__name__: run(case) for case in CASES}
    ray.shutdown()
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(results, indent=0) + "\n")
        ENVIRONMENT.write_text(json.dumps(environment(), indent=1) + "\n")
        print(f"wrote {GOLDEN}: {len(results)} cases, and {ENVIRONMENT}")
    else:
        golden = json.loads(GOLDEN.read_text())
        bad = [k for k in results if results[k] != golden.get(k)]
        print("identical" if not bad else f"differ: {bad}")
        sys.exit(1 if bad else 0)
