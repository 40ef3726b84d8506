"""Hostile and malformed input, generated (hypothesis): data, configs and ``--set``, run stores.

Every case ends in a correct result or a clear error of distvi's own type that names what is
wrong (the array, the key, the store); never a crash or a traceback from inside numpy,
PyTensor or Zarr. The examples are derandomized, so CI runs the same cases every time."""

import json
import shutil
import string
from pathlib import Path

import numpy as np
import pymc as pm
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

import distvi as dv
from distvi.cli import main, summary_text
from distvi.config import ConfigError, apply_override, load, validate
from distvi.data import ArraySource, DataError
from distvi.runs import open_run
from distvi.store import StoreError

ROOT = Path(__file__).resolve().parent.parent
FAST = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(FAST, max_examples=8)

# ------------------------------------------------------------------ data

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int8", "uint16", "bool",
          "object", "<U3", "complex128", "datetime64[s]"]


@st.composite
def hostile_array(draw, rows):
    """An array of a random dtype and shape (rows, 0-2 trailing axes of width 0-3), with NaN
    or inf sometimes, non-contiguous or read-only sometimes; or a scalar or a ragged list."""
    kind = draw(st.sampled_from(["array"] * 8 + ["scalar", "ragged"]))
    if kind == "scalar":
        return np.float64(draw(st.floats(-10, 10)))
    if kind == "ragged":
        return [[1.0] * (1 + i % 2) for i in range(rows)]
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    trailing = draw(st.lists(st.integers(0, 3), max_size=2))
    shape = (rows, *trailing)
    if dtype.kind == "f":
        elements = st.floats(-100, 100, width=dtype.itemsize * 8)
    elif dtype.kind in "iu":
        elements = st.integers(0 if dtype.kind == "u" else -100, 100)
    else:
        elements = None
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if dtype.kind == "f" and arr.size and draw(st.booleans()):
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    layout = draw(st.sampled_from(["c", "fortran", "strided", "readonly"]))
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "strided":  # every other row of a twice-as-long array: a non-contiguous view
        big = np.repeat(arr, 2, axis=0)
        arr = big[::2]
    elif layout == "readonly":
        arr.flags.writeable = False
    return arr


def usable(value) -> str | None:
    """Independently of distvi: why this array cannot be data (None when it can)."""
    try:
        arr = np.asarray(value)
    except ValueError:
        return "not a rectangular array"
    if arr.ndim == 0:
        return "scalar"
    if arr.dtype.kind not in "biuf":
        return "non-numeric dtype"
    if arr.shape[0] == 0:
        return "no rows"
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return "NaN or inf"
    return None


@st.composite
def hostile_data(draw):
    rows = draw(st.integers(0, 6))
    names = draw(st.lists(st.sampled_from(["y", "x", "w"]), min_size=1, max_size=3, unique=True))
    data = {name: draw(hostile_array(rows)) for name in names}
    if len(names) > 1 and draw(st.integers(0, 5)) == 0:  # one array with other row counts
        data[names[-1]] = np.zeros(rows + draw(st.integers(1, 3)))
    return data


@FAST
@given(hostile_data())
def test_any_data_is_kept_exactly_or_refused_naming_the_array(data):
    problems = {name: usable(v) for name, v in data.items()}
    bad = {name: why for name, why in problems.items() if why}
    rows = {name: len(v) for name, v in data.items() if isinstance(v, list) or np.ndim(v) > 0}
    try:
        source = ArraySource(data)
    except DataError as err:
        named = [name for name in bad if repr(name) in str(err)]
        assert named or (len(set(rows.values())) > 1 and "row counts" in str(err)), str(err)
        return
    assert not bad, f"accepted {bad}"
    assert len(set(rows.values())) == 1
    for name, value in data.items():
        kept = source.read(0, source.n_rows)[name]
        np.testing.assert_array_equal(kept, np.asarray(value).astype(kept.dtype))
        assert kept.dtype.kind in "iuf"


def normal_mean(data):
    with pm.Model() as m:
        mu = pm.Normal("mu", 0.0, 1.0)
        pm.Normal("obs", mu, 1.0, observed=data["y"])
    return m


@SLOW
@given(hostile_array(rows=7))
def test_the_workers_see_exactly_the_rows_given_or_the_fit_is_refused(y):
    """The full-data log-likelihood the shard workers compute equals scipy's on the array as
    given (float16, ints, bools, strided, read-only, zero-width...), or the fit is refused
    before any work with an error naming the array."""
    why = usable(y)
    try:
        inference = dv.ADVI(model=normal_mean, data={"y": y}, num_workers=2, batch_size=3,
                            random_seed=1)
    except DataError as err:
        assert why is not None and "'y'" in str(err), str(err)
        return
    assert why is None
    with inference:
        points = np.array([[-0.7], [0.0], [1.3]])
        got = inference.full_data_logp(points)
        inference.fit(5, progressbar=False)
    values = np.asarray(y, dtype="float64")
    want = [stats.norm.logpdf(values, mu, 1.0).sum() for mu in points[:, 0]]
    np.testing.assert_allclose(got, want, rtol=1e-6 if np.asarray(y).dtype != np.float32 else 1e-5)
    assert np.isfinite(inference.approx.mean).all()


# ------------------------------------------------------------------ configs and --set

BASE = {"model": "jobs.quickstart:model",
        "data": {"kind": "loader", "loader": "jobs.quickstart:load", "options": {"rows": 300}},
        "n": 10, "backend": "local", "progress": "off"}
KEYS = ["n", "method", "optimizer", "optimizer.learning_rate", "optimizer.name", "batch_size",
        "num_workers", "seed", "tracking", "tracking.log_every", "tracking.tracking_uri",
        "store", "checkpoint_every", "average_from", "diagnose", "data.kind", "data.path",
        "method_options", "method_options.n_particles", "obj_n_mc", "model", "progress",
        "total_grad_norm_constraint", "address", "max_n", "tol", "start", "start_sigma",
        "start_sigma.beta", "start.intercept"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=12))


def names(err, key) -> bool:
    """The error names the key (as written, or escaped as repr escapes it)."""
    return key in str(err) or repr(key)[1:-1] in str(err)


@FAST
@given(st.dictionaries(keys, values, min_size=1, max_size=3))
def test_any_config_is_valid_or_refused_naming_the_key(changes):
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        try:
            apply_override(raw, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
        except ConfigError as err:
            assert names(err, key.split(".")[0]) or "--set" in str(err), str(err)
            return
    try:
        cfg = validate(raw)
    except ConfigError as err:
        top = [k for k in raw if k not in BASE or raw[k] != BASE[k]]
        assert any(names(err, k) for k in top), (str(err), top)
        return
    assert (cfg["n"] is None or cfg["n"] >= 1) and cfg["method"] in ("advi", "fullrank_advi", "svgd", "asvgd")


@FAST
@given(st.text(alphabet=string.printable + "éß中\u202e", max_size=40))
def test_any_set_argument_is_applied_or_refused(text):
    raw = json.loads(json.dumps(BASE))
    try:
        apply_override(raw, text)
        validate(raw)
    except ConfigError:
        pass  # a clear error of the config's own type: that is the property


@pytest.mark.parametrize("doc", [
    "model: !!python/object/apply:os.system ['echo pwned']\n",
    "!!python/object/new:os.system [echo pwned]\n",
    "n: !!python/name:os.system\n",
    "n: &a [*a]\n",
])
def test_yaml_that_would_build_python_objects_is_refused(tmp_path, doc, capfd):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + doc if not doc.startswith("!!") else doc)
    with pytest.raises(ConfigError):
        load(path)
    assert "pwned" not in capfd.readouterr().out


def test_set_with_a_python_tag_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="--set model: not a valid YAML value"):
        load(path, ["model=!!python/object/apply:os.system ['echo pwned']"])


def test_huge_numbers_are_refused_naming_the_key():
    for key, value, match in [("n", 10**12, "n must be <= "), ("seed", 2**64, "seed is too large"),
                              ("num_workers", 10**9, "num_workers must be <= ")]:
        with pytest.raises(ConfigError, match=match):
            validate({**BASE, key: value})


# ------------------------------------------------------------------ run stores

@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    """A real run store written by ``distvi run`` (checkpoint, traces, posterior, job)."""
    import os

    tmp = tmp_path_factory.mktemp("stores")
    store = tmp / "run.zarr"
    cfg = {**BASE, "n": 40, "store": str(store), "checkpoint_every": 20}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["run", str(path)]) == 0
    finally:
        os.chdir(cwd)
    return store


def store_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


mutations = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.integers(0, 200)),
    st.tuples(st.just("garble"), st.integers(0, 10**6), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("attr"), st.sampled_from(["config", "layout", "data", "checkpoint", "job",
                                                 "distvi_run_store", "status", "diagnosis"]), values),
    st.tuples(st.just("checkpoint_attr"), st.sampled_from(["shapes", "dtypes", "n_params", "step",
                                                            "n_average", "n_trace"]), values),
)


def mutate(store: Path, mutation) -> None:
    files = store_files(store)
    kind = mutation[0]
    if kind in ("delete", "truncate", "garble"):
        path = store / files[mutation[1] % len(files)]
        if kind == "delete":
            path.unlink()
        elif kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[:mutation[2] % max(1, len(data))])
        else:
            data = bytearray(path.read_bytes()) or bytearray(b"\0")
            at = mutation[2] % len(data)
            data[at:at + len(mutation[3])] = mutation[3]
            path.write_bytes(bytes(data))
        return
    if kind == "attr":
        meta = store / "zarr.json"
    else:
        meta = next(store.glob("checkpoints/c*/zarr.json"))
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {})[mutation[1]] = mutation[2]
    meta.write_text(json.dumps(doc))


@settings(FAST, max_examples=60)
@given(mutations)
def test_a_tampered_store_is_read_correctly_or_refused(finished_store, tmp_path_factory, mutation):
    store = tmp_path_factory.mktemp("tampered") / "run.zarr"
    shutil.copytree(finished_store, store)
    mutate(store, mutation)
    for read in (open_run, summary_text):
        try:
            read(str(store))
        except StoreError as err:
            assert str(store) in str(err) or "run store" in str(err), str(err)


def test_a_foreign_zarr_group_and_a_plain_directory_are_refused(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["hello"] = 1
    (tmp_path / "plain").mkdir()
    for store in (tmp_path / "foreign.zarr", tmp_path / "plain", tmp_path / "missing"):
        with pytest.raises(StoreError):
            open_run(str(store))
        assert main(["summary", str(store)]) == 2
        assert main(["resume", str(store)]) == 2


def test_a_fit_longer_than_the_loop_keeps_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"n must be <= 1e\+09 steps per fit"):
        dv.fit(10**9 + 1, model=normal_mean, data={"y": np.ones(3)})


@pytest.mark.parametrize("damage, match", [
    ("checkpoint", "checkpoint .* is unreadable .*checksum"),
    ("posterior", "posterior draws do not match the checksum"),
    ("trace", "trace/step is not one row per consecutive step"),
])
def test_each_kind_of_damage_is_named(finished_store, tmp_path, damage, match):
    store = tmp_path / "run.zarr"
    shutil.copytree(finished_store, store)
    if damage == "checkpoint":
        chunk = next(p for p in store.glob("checkpoints/c*/c/*") if p.is_file())
        chunk.unlink()  # Zarr reads a missing chunk as fill values: only the checksum tells
    elif damage == "posterior":
        chunk = next(p for p in sorted(store.glob("posterior/posterior/*/c/**/*")) if p.is_file())
        chunk.unlink()
    else:
        next(p for p in store.glob("trace/step/c/*") if p.is_file()).unlink()
    with pytest.raises(StoreError, match=match):
        open_run(str(store)).posterior()
    assert main(["summary", str(store)]) == 2
