"""The run store: one Zarr v3 group per run, written as the run goes, readable by anyone.

Layout (``store`` is a local path or an fsspec URL)::

    zarr.json                  attributes: format marker, config, parameter layout, data,
                               versions, status, the name of the last complete checkpoint
    trace/<name>               1-D arrays appended in blocks: step, loss, grad_norm,
                               step_seconds, learning_rate, rows_per_s
    checkpoints/<cNNN>         the parameters and optimizer state as one float64 array, with
                               attributes (shapes, dtypes, step, opt_step, draw_position,
                               trace length)
    posterior/                 at the end: InferenceData as a Zarr DataTree

A checkpoint is written under a new name first; only then does the root attribute
``checkpoint`` point to it (a single metadata write, atomic on local disks and object
stores), and older checkpoints are removed. A crash mid-write leaves the previous checkpoint
named and complete. Nothing in a store is pickled or executed: attributes are JSON and
arrays are numbers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = 2  # 2: checksums on checkpoints and posterior draws
MARKER = "distvi_run_store"
TRACES = ("step", "loss", "grad_norm", "step_seconds", "learning_rate", "rows_per_s")
TRACE_CHUNK = 4096


class StoreError(ValueError):
    """A run store is missing, foreign, damaged, or does not match the run (the message
    never carries a URL's password)."""

    def __init__(self, message: str) -> None:
        from distvi.redact import redact

        super().__init__(redact(message))


def store_url(store: Any) -> str:
    """The URL of a store given as a path or URL (refused when it is neither)."""
    import os

    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if not isinstance(store, str) or not store:
        raise TypeError(f"store must be a path or an fsspec URL, got {store!r}")
    return store.rstrip("/")


def jsonable(value: Any) -> Any:
    """A JSON value for an attribute (numbers, strings, lists, dicts; repr otherwise)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else repr(v)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return repr(value)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("distvi", "pymc", "pytensor", "ray", "zarr", "mlflow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


@dataclass
class Checkpoint:
    """The state a run can continue from."""

    params: list[np.ndarray]
    opt_state: list[np.ndarray]
    step: int
    opt_step: int
    draw_position: int
    n_trace: int
    name: str
    average: list[np.ndarray] = field(default_factory=list)
    n_averaged: int = 0
    local_states: list[dict] | None = None  # per shard, with local variables


def _check_attrs(url: str, attrs: dict[str, Any]) -> None:
    """The root attributes readers rely on, each of the type they expect."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise StoreError(f"run store {url!r} is damaged: {what}")

    config, data, layout = attrs.get("config"), attrs.get("data"), attrs.get("layout")
    need(isinstance(config, dict) and isinstance(config.get("fit"), dict),
         "attribute 'config' is not a mapping with a 'fit' mapping")
    need(isinstance(config["fit"].get("optimizer", {}), dict), "config.fit.optimizer is not a mapping")
    need(isinstance(data, dict), "attribute 'data' is not a mapping")
    need(isinstance(layout, list) and all(isinstance(v, dict) for v in layout),
         "attribute 'layout' is not a list of variables")
    need(isinstance(attrs.get("status", ""), str), "attribute 'status' is not a string")
    need(attrs.get("checkpoint") is None or isinstance(attrs["checkpoint"], str),
         "attribute 'checkpoint' is not a name")
    need(attrs.get("job") is None or isinstance(attrs["job"], dict), "attribute 'job' is not a mapping")
    rebuild = attrs.get("rebuild")
    need(rebuild is None or (isinstance(rebuild, dict) and isinstance(rebuild.get("data"), dict)
                             and all(rebuild.get(k) is None or isinstance(rebuild[k], str)
                                     for k in ("model", "model_why"))),
         "attribute 'rebuild' is not a model reference and a data description")
    diag = attrs.get("diagnosis")
    need(diag is None or (isinstance(diag, dict) and all(
        isinstance(diag.get(k), int | float) and not isinstance(diag.get(k), bool)
        for k in ("khat", "ess", "draws"))), "attribute 'diagnosis' is not a diagnosis")


def _checkpoint_digest(flat: np.ndarray, meta: dict[str, Any]) -> str:
    """SHA-256 over a checkpoint's values and the attributes that say how to read them."""
    import json

    h = hashlib.sha256(np.ascontiguousarray(flat, dtype="<f8").tobytes())
    h.update(json.dumps({k: meta[k] for k in sorted(meta) if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


class RunStore:
    """A run's Zarr group (see the module docstring for the layout)."""

    def __init__(self, url: str, group) -> None:
        self.url, self.group = url, group
        self._buffer: dict[str, list] = {k: [] for k in TRACES}

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, store: Any, attrs: dict[str, Any]) -> RunStore:
        """A new store; refuses a location that already holds one (nothing is overwritten)."""
        import zarr

        url = store_url(store)
        if cls.exists(url):
            raise StoreError(f"a run store already exists at {url!r}: resume it (resume=True) "
                             f"or give a new path")
        try:
            group = zarr.open_group(url, mode="w-", zarr_format=3)
        except Exception as err:
            raise StoreError(f"cannot create a run store at {url!r}: {err}") from err
        group.attrs.update(jsonable({MARKER: FORMAT, **attrs, "checkpoint": None,
                                      "status": "running"}))
        for name in TRACES:  # a lost chunk reads as the fill value: -1 and NaN show it
            step = name == "step"
            group.create_array(f"trace/{name}", shape=(0,), chunks=(TRACE_CHUNK,),
                               dtype="int64" if step else "float64",
                               fill_value=-1 if step else np.nan)
        return cls(url, group)

    @staticmethod
    def exists(store: Any) -> bool:
        import zarr

        try:
            zarr.open_group(store_url(store), mode="r")
        except Exception:
            return False
        return True

    @classmethod
    def open(cls, store: Any, mode: str = "r") -> RunStore:
        """An existing store, checked to be a distvi run store of this format."""
        import zarr

        url = store_url(store)
        try:
            group = zarr.open_group(url, mode=mode)
        except Exception as err:
            raise StoreError(f"no run store at {url!r} ({type(err).__name__}: {err})") from None
        attrs = dict(group.attrs)
        if isinstance(attrs.get(MARKER), int) and attrs[MARKER] < FORMAT:
            raise StoreError(f"{url!r} was written by an older distvi (store format "
                             f"{attrs[MARKER]}; this version reads format {FORMAT})")
        if attrs.get(MARKER) != FORMAT:
            raise StoreError(f"{url!r} is not a distvi run store (no {MARKER!r}={FORMAT} attribute)")
        _check_attrs(url, attrs)
        try:
            missing = [n for n in TRACES if f"trace/{n}" not in group]
        except Exception as err:
            raise StoreError(f"run store {url!r} is damaged: {err}") from None
        if missing:
            raise StoreError(f"run store {url!r} is damaged: traces {missing} are missing")
        return cls(url, group)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def set_attrs(self, **attrs: Any) -> None:
        self.group.attrs.update(jsonable(attrs))

    # ------------------------------------------------------------------ traces
    def append(self, step: np.ndarray, **values: np.ndarray) -> None:
        """Buffer trace rows (written by :meth:`flush`)."""
        self._buffer["step"].append(np.asarray(step, dtype="int64"))
        for name in TRACES[1:]:
            self._buffer[name].append(np.asarray(values[name], dtype="float64"))

    def flush(self) -> None:
        """Write buffered trace rows: one resize and one write per trace."""
        if not self._buffer["step"]:
            return
        for name in TRACES:
            block = np.concatenate(self._buffer[name])
            arr = self.group[f"trace/{name}"]
            n = arr.shape[0]
            arr.resize((n + block.size,))
            arr[n:] = block
            self._buffer[name] = []

    def traces(self) -> dict[str, np.ndarray]:
        """Every trace as a numpy array, by name."""
        return {name: self.group[f"trace/{name}"][:] for name in TRACES}

    def checked_traces(self, n_trace: int | None) -> dict[str, np.ndarray]:
        """The committed traces: the first ``n_trace`` rows (the last checkpoint's; rows past
        it are a write that a crash may have cut), refused when they are not whole: one row
        per consecutive step, finite step timings (a lost chunk reads as fill values)."""
        try:
            traces = self.traces()
        except Exception as err:
            raise StoreError(f"run store {self.url!r}: the traces are unreadable "
                             f"({type(err).__name__}: {err})") from None
        lengths = {name: t.shape for name, t in traces.items()}
        if any(len(shape) != 1 for shape in lengths.values()):
            raise StoreError(f"run store {self.url!r} is damaged: traces are not 1-D {lengths}")
        n = min(shape[0] for shape in lengths.values()) if n_trace is None else n_trace
        if any(shape[0] < n for shape in lengths.values()):
            raise StoreError(f"run store {self.url!r} is damaged: the checkpoint counts {n} trace "
                             f"rows, the traces have {lengths}")
        traces = {name: t[:n] for name, t in traces.items()}
        steps = traces["step"]
        if steps.size and (steps[0] < 1 or not np.array_equal(steps, np.arange(steps[0], steps[0] + steps.size))):
            raise StoreError(f"run store {self.url!r} is damaged: trace/step is not one row per "
                             f"consecutive step")
        for name in ("grad_norm", "step_seconds", "learning_rate"):
            if not np.isfinite(traces[name]).all():
                raise StoreError(f"run store {self.url!r} is damaged: trace/{name} has missing values")
        return traces

    def truncate(self, n: int) -> None:
        """Drop trace rows past ``n`` (steps redone after a resume)."""
        for name in TRACES:
            arr = self.group[f"trace/{name}"]
            if arr.shape[0] > n:
                arr.resize((n,))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, params, opt_state, step: int, opt_step: int, draw_position: int,
                   average=(), n_averaged: int = 0, local_states: list[dict] | None = None) -> None:
        """Flush the traces, write the state under a new name, then point to it.

        The state is one float64 array (parameters, then optimizer state, flattened; integer
        counters are exact in float64) with the pieces' shapes and dtypes as attributes: one
        array write and two metadata writes per checkpoint. With local variables, each shard's
        worker state is one more array (``<name>_locals/r<k>``), written before the commit.
        """
        self.flush()
        n_trace = int(self.group["trace/step"].shape[0])
        name = f"c{step:012d}"
        path = f"checkpoints/{name}"
        pieces = [np.asarray(p) for p in (*params, *opt_state, *average)]
        flat = np.concatenate([p.astype("float64").ravel() for p in pieces]) if pieces else np.zeros(0)
        self._write(path, flat)
        for k, state in enumerate(local_states or ()):
            self._write_local(f"{path}_locals/r{k}", state)
        meta = {"step": int(step), "opt_step": int(opt_step), "draw_position": int(draw_position),
                "n_trace": n_trace, "n_params": len(params), "n_average": len(average),
                "n_averaged": int(n_averaged), "n_local_shards": len(local_states or ()),
                "shapes": [list(p.shape) for p in pieces], "dtypes": [str(p.dtype) for p in pieces]}
        self.group[path].attrs.update({**meta, "sha256": _checkpoint_digest(flat, meta)})
        previous = self.group.attrs.get("checkpoint")
        self.group.attrs["checkpoint"] = name  # the commit
        for old in ((f"checkpoints/{previous}", f"checkpoints/{previous}_locals")
                    if previous and previous != name else ()):
            if old in self.group:
                del self.group[old]

    def _write_local(self, path: str, state: dict) -> None:
        """One shard's local state (see :meth:`LocalShardWorker.local_state`) as one array."""
        pieces = [np.asarray(p) for key in ("mu", "rho", "slots", "counters") for p in state[key]]
        flat = np.concatenate([p.astype("float64").ravel() for p in pieces])
        self._write(path, flat)
        meta = {"group_lo": int(state["group_lo"]), "offset": int(state["offset"]),
                "optimizer": state["optimizer_name"],
                "counts": [len(state[key]) for key in ("mu", "rho", "slots", "counters")],
                "shapes": [list(p.shape) for p in pieces]}
        self.group[path].attrs.update({**meta, "sha256": _checkpoint_digest(flat, meta)})

    def _read_local(self, path: str) -> dict:
        arr = self.group[path]
        a = dict(arr.attrs)
        flat = np.ascontiguousarray(arr[...], dtype="float64")
        if a.get("sha256") != _checkpoint_digest(flat, a):
            raise ValueError(f"{path}: its values or attributes do not match the checksum")
        pieces, offset = [], 0
        for shape in a["shapes"]:
            size = int(np.prod(shape))
            pieces.append(flat[offset:offset + size].reshape(shape).copy())
            offset += size
        out, at = {}, 0
        for key, count in zip(("mu", "rho", "slots", "counters"), a["counts"]):
            out[key], at = pieces[at:at + count], at + count
        return {**out, "group_lo": a["group_lo"], "offset": a["offset"],
                "optimizer_name": a["optimizer"], "optimizer": None}

    def _write(self, path: str, value) -> None:
        value = np.asarray(value)
        arr = self.group.create_array(path, shape=value.shape, dtype=value.dtype,
                                      chunks=tuple(max(1, d) for d in value.shape), overwrite=True)
        arr[...] = value

    def last_checkpoint(self) -> Checkpoint | None:
        name = self.group.attrs.get("checkpoint")
        if name is None:
            return None
        try:
            arr = self.group[f"checkpoints/{name}"]
            a = dict(arr.attrs)
            flat = np.ascontiguousarray(arr[...], dtype="float64")
            if a.get("sha256") != _checkpoint_digest(flat, a):
                raise ValueError("its values or attributes do not match the checksum written with them")
            pieces, offset = [], 0
            for shape, dtype in zip(a["shapes"], a["dtypes"]):
                if np.dtype(dtype).kind not in "biuf":
                    raise ValueError(f"dtype {dtype!r} is not numeric")
                size = int(np.prod(shape))
                pieces.append(flat[offset:offset + size].reshape(shape).astype(np.dtype(dtype)))
                offset += size
            if offset != flat.size:
                raise ValueError(f"{flat.size} values for pieces of {offset}")
            k, m = int(a["n_params"]), int(a.get("n_average", 0))
            state = pieces[k:len(pieces) - m]
            shards = int(a.get("n_local_shards", 0))
            local_states = [self._read_local(f"checkpoints/{name}_locals/r{r}")
                            for r in range(shards)] if shards else None
            return Checkpoint(pieces[:k], state, int(a["step"]), int(a["opt_step"]),
                              int(a["draw_position"]), int(a["n_trace"]), name,
                              pieces[len(pieces) - m:] if m else [], int(a.get("n_averaged", 0)),
                              local_states)
        except Exception as err:
            raise StoreError(f"run store {self.url!r}: checkpoint {name!r} is unreadable "
                             f"({type(err).__name__}: {err})") from None

    # ------------------------------------------------------------------ posterior
    def write_posterior(self, idata) -> None:
        """The posterior draws as a Zarr DataTree at ``<store>/posterior``."""
        import warnings

        with warnings.catch_warnings():  # zarr notes that consolidated metadata is an extension
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification")
            idata.to_datatree().to_zarr(f"{self.url}/posterior", mode="w")
        self.set_attrs(posterior_sha256=posterior_digest(idata))

    def size_bytes(self) -> int | None:
        """Bytes on disk for a local store (None for remote ones)."""
        import os

        if "://" in self.url and not self.url.startswith("file://"):
            return None
        root = self.url.removeprefix("file://")
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


@dataclass
class Run:
    """What :func:`open_run` returns."""

    url: str
    config: dict[str, Any]
    layout: list
    data: dict[str, Any]
    versions: dict[str, str]
    status: str
    traces: dict[str, np.ndarray]
    checkpoint: Checkpoint | None
    approximation: Any = None
    diagnosis: dict[str, Any] | None = None  # PSIS k-hat etc. (approx.diagnose())
    posterior_sha256: str | None = None

    def local_draws(self, name: str) -> np.ndarray:
        """The draws of local variable ``name`` the workers wrote (when there were too many to
        gather), every shard's groups in order: (draws, groups, width), unconstrained for a
        transformed variable (``name`` is then its value variable's, e.g. ``s_log__``)."""
        import zarr

        group = zarr.open_group(self.url, mode="r")
        if f"local_draws/{name}" not in group:
            raise StoreError(f"run store {self.url!r} holds no draws of local variable {name!r} "
                             f"written by the workers")
        parts = group[f"local_draws/{name}"]
        ranks = sorted((k for k, _ in parts.arrays()), key=lambda k: int(k[1:]))
        return np.concatenate([np.asarray(parts[k][...]) for k in ranks], axis=1)

    def posterior(self):
        """The posterior draws written at the end of the run (InferenceData)."""
        import arviz as az
        import xarray as xr

        if not self.posterior_sha256:
            raise StoreError(f"run store {self.url!r} has no posterior draws yet "
                             f"(status {self.status!r})")
        try:
            idata = az.from_datatree(xr.open_datatree(f"{self.url}/posterior", engine="zarr"))
            ok = posterior_digest(idata) == self.posterior_sha256
        except Exception as err:
            raise StoreError(f"run store {self.url!r}: the posterior draws are unreadable "
                             f"({type(err).__name__}: {err})") from None
        if not ok:
            raise StoreError(f"run store {self.url!r} is damaged: the posterior draws do not "
                             f"match the checksum written with them")
        return idata


def posterior_digest(idata) -> str:
    """A SHA-256 over every group's variables and coordinates (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for group in sorted(idata.groups()):
        ds = idata[group]
        for name in sorted(map(str, ds.variables)):
            values = np.asarray(ds.variables[name].values)
            h.update(f"{group}/{name}|{values.dtype.kind}|{values.shape}|".encode())
            if values.dtype.kind in "biufc":
                h.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())
            else:  # labels: their text
                h.update(repr(values.tolist()).encode())
    return h.hexdigest()
