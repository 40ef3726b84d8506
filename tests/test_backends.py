"""Both backends keep the Backend contract; the local one is the reference sum over shards."""

import numpy as np
import pytest

from distvi.backends import Backend, LocalBackend
from distvi.backends.ray import RayBackend, WorkerSpec
from distvi.data import ArraySource, shard_bounds
from distvi.model import DataSchema, ModelAdapter
from distvi.worker import ShardWorker, compiled_by_points

from conftest import logistic_factory


@pytest.fixture(scope="module")
def adapter(logistic_data):
    return ModelAdapter.from_factory(logistic_factory, DataSchema.of(logistic_data))


def _workers(adapter, data, k, batch_size=50, seed=7):
    src = ArraySource(data)
    term = compiled_by_points(adapter.data_term())
    return [ShardWorker(src.read(a, b), r, seed, batch_size, term)
            for r, (a, b) in enumerate(shard_bounds(src.n_rows, k))]


def test_both_backends_are_backends(adapter, logistic_data):
    assert isinstance(LocalBackend(_workers(adapter, logistic_data, 2)), Backend)
    # constructing a RayBackend starts nothing: the contract is checked without Ray running
    spec = WorkerSpec(adapter.data_term(), ArraySource(logistic_data))
    assert isinstance(RayBackend(spec, ArraySource(logistic_data), 2), Backend)
    assert not isinstance(object(), Backend)


@pytest.mark.parametrize("with_logp", [True, False])
def test_local_evaluate_is_the_sum_of_its_workers(adapter, logistic_data, with_logp):
    points = np.random.default_rng(1).normal(size=(3, adapter.ndim))
    with LocalBackend(_workers(adapter, logistic_data, 2)) as backend:
        assert backend.num_workers == 2
        logp, grad = backend.evaluate(points, 11, with_logp)
        assert backend.last_compute_s > 0
    assert backend.num_workers == 0  # closed on leaving the block
    (lp0, g0), (lp1, g1) = (w.evaluate(points, 11, with_logp)
                            for w in _workers(adapter, logistic_data, 2))
    np.testing.assert_array_equal(logp, lp0 + lp1)
    np.testing.assert_array_equal(grad, g0 + g1)


def test_local_call_runs_in_rank_order_and_share_is_the_array(adapter, logistic_data):
    backend = LocalBackend(_workers(adapter, logistic_data, 3))
    x = np.arange(3.0)
    assert backend.share(x) is x
    assert backend.call("__getattribute__", (), [("rank",)] * 3) == [0, 1, 2]


def test_a_backend_without_shards_answers_zeros():
    backend = LocalBackend([])
    points = np.ones((2, 4))
    logp, grad = backend.evaluate(points, 0)
    np.testing.assert_array_equal(logp, np.zeros(2))
    np.testing.assert_array_equal(grad, np.zeros((2, 4)))


WORKER_FINDINGS = r"""
import json, sys, numpy as np
sys.path.insert(0, {tests!r})
import pytensor
from pytensor.link.c.cmodule import GCC_compiler
from distvi._compile import adopt_compiler_facts, compiler_facts, _bundled_flags
from distvi.backends.ray_actor import ShardActor, WorkerSpec
from distvi.data import ArraySource
from distvi.model import DataSchema, ModelAdapter
from conftest import logistic_factory
facts = json.loads(sys.argv[1])
if facts.get("blas") == "user":  # the driver's findings as a worker on another host gets them
    facts = dict(facts["real"], host="elsewhere")
adopt_compiler_facts(facts)
adopted = {{"blas": pytensor.config.blas__ldflags == _bundled_flags(), "march": GCC_compiler.march_flags}}
rng = np.random.default_rng(0)
X = rng.normal(size=(200, 3)); data = {{"X": X, "y": (X @ [1.0, -1.0, 0.5] > 0).astype("int64")}}
adapter = ModelAdapter.from_factory(logistic_factory, DataSchema.of(data))
actor = ShardActor(WorkerSpec(adapter.data_term(), ArraySource(data), compiler=facts), 0, 0, 200)
logp, grad, _ = actor.evaluate(np.full((1, adapter.ndim), 0.1), 3)
print(json.dumps({{**adopted, "logp": logp.tolist(), "grad": grad.tolist()}}))
"""


def test_a_worker_takes_the_drivers_compiler_findings_on_its_host_only(tmp_path, adapter, logistic_data):
    """A Ray worker takes its driver's BLAS and CPU-flag findings instead of compiling test
    programs for them; the CPU flags only on the driver's host; the answers are the same."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from distvi._compile import compiler_facts

    facts = compiler_facts()
    assert facts["blas"] == "bundled" and facts["march"] is not None
    script = tmp_path / "worker.py"
    script.write_text(WORKER_FINDINGS.format(tests=str(Path(__file__).parent)))
    runs = {}
    for name, given in [("same host", facts), ("other host", {"blas": "user", "real": facts})]:
        out = subprocess.run([sys.executable, str(script), json.dumps(given)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["same host"]["blas"] and runs["same host"]["march"] == facts["march"]
    # on another host the CPU flags are left for the worker to find (none taken)
    assert runs["other host"]["blas"] and runs["other host"]["march"] is None
    assert runs["same host"]["logp"] == runs["other host"]["logp"]
    assert runs["same host"]["grad"] == runs["other host"]["grad"]


def test_the_workers_of_a_local_instance_get_a_compile_cache_of_their_own():
    import pytensor

    from distvi.backends.ray_cluster import worker_pytensor_flags

    own = "compiledir_format=distvi-worker_" + pytensor.config.compiledir_format
    assert worker_pytensor_flags(None) == own
    assert worker_pytensor_flags("floatX=float64,cxx=g++") == "floatX=float64,cxx=g++," + own


LEAN_WORKER = r"""
import json, sys, numpy as np
sys.path.insert(0, {tests!r})
import distvi
deferred = "scipy.signal" not in sys.modules and "scipy.stats" not in sys.modules
import pytensor, pytensor.tensor as pt
from distvi.backends.ray_actor import ShardActor, WorkerSpec
from distvi.data import ArraySource
from distvi.model import DataSchema, ModelAdapter
from conftest import logistic_factory
rng = np.random.default_rng(0)
X = rng.normal(size=(200, 3)); data = {{"X": X, "y": (X @ [1.0, -1.0, 0.5] > 0).astype("int64")}}
adapter = ModelAdapter.from_factory(logistic_factory, DataSchema.of(data))
actor = ShardActor(WorkerSpec(adapter.data_term(), ArraySource(data)), 0, 0, 200)
logp, grad, _ = actor.evaluate(np.full((1, adapter.ndim), 0.1), 3)
a, k = pt.dmatrix("a"), pt.dmatrix("k")  # PyTensor's one caller of scipy.signal.convolve
conv = pytensor.function([a, k], pt.signal.convolve2d(a, k, mode="full"))
got = conv(np.arange(6.0).reshape(2, 3), np.array([[1.0, -2.0], [0.5, 3.0]]))
import scipy.signal
print(json.dumps({{"deferred": deferred, "logp": logp.tolist(), "grad": grad.tolist(),
                  "conv": got.tolist(), "real_after": hasattr(scipy.signal, "find_peaks")}}))
"""


def test_a_ray_workers_imports_defer_scipy_signal_and_change_no_number(tmp_path):
    """In a worker of a local instance (``DISTVI_RAY_WORKER``) PyTensor is imported without
    ``scipy.signal`` (~0.6 s of CPU a worker); a data term's answers are the same bit for
    bit as without, PyTensor's convolution still gives the hand-computed answer, and a
    later ``import scipy.signal`` is the real module."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distvi._lean import WORKER_ENV

    script = tmp_path / "lean.py"
    script.write_text(LEAN_WORKER.format(tests=str(Path(__file__).parent)))
    runs = {}
    for name, flag in [("worker", "1"), ("driver", None)]:
        env = {k: v for k, v in os.environ.items() if k != WORKER_ENV}
        if flag:
            env[WORKER_ENV] = flag
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["worker"]["deferred"] is True and runs["driver"]["deferred"] is False
    a, k = np.arange(6.0).reshape(2, 3), np.array([[1.0, -2.0], [0.5, 3.0]])
    full = np.zeros((3, 4))  # the full 2-d convolution, by its definition
    for i in range(2):
        for j in range(3):
            full[i:i + 2, j:j + 2] += a[i, j] * k
    for run in runs.values():
        np.testing.assert_allclose(run["conv"], full, rtol=0, atol=1e-12)
        assert run["real_after"]
    assert runs["worker"]["logp"] == runs["driver"]["logp"]
    assert runs["worker"]["grad"] == runs["driver"]["grad"]
