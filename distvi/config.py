"""Run configs: a YAML file (or dict) that says what to fit, on what, how, and where to record it.

Every key is checked before anything runs: an unknown or mistyped key, a wrong type, a
value out of range or a missing file gives a :class:`ConfigError` naming the key and what it
accepts. YAML is safe-loaded (no tags that build Python objects). A config names code that
will be run: ``model`` (and a ``loader`` data source) are ``module:function`` references,
imported when the run starts — run only configs you trust.

``n: null`` (or ``n: auto``) fits until converged (see :mod:`distvi.convergence`), at most
``max_n`` steps, until successive phases agree within ``tol``; without an ``optimizer`` the
first phase's rate is then ``adam(learning_rate=0.1)`` (relative to each coordinate's scale,
as ``fit(n=None)`` defaults), and the fit starts from ``start: map`` unless ``start`` or
``start_sigma`` give it a start of its own. ``start`` is ``map`` or initial values by variable
name, ``start_sigma`` initial standard deviations (unconstrained space) by variable name.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

METHODS = ("advi", "fullrank_advi", "svgd", "asvgd")
OPTIMIZERS = ("sgd", "momentum", "nesterov_momentum", "adagrad", "adagrad_window", "rmsprop",
              "adadelta", "adam", "adamax")
DATA_KINDS = ("loader", "npz", "zarr", "parquet")
PROGRESS = ("auto", "bar", "lines", "off")
MAX_INT = 2**63 - 1  # integers beyond int64 cannot reach numpy
REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class ConfigError(ValueError):
    """A run config is not valid; the message names the key."""


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "an int", float: "a number", str: "a string", bool: "true/false",
            dict: "a mapping", list: "a list", type(None): "null"}.get(t, t.__name__)


# key -> (types, default); None in types means optional null
TOP: dict[str, tuple[tuple, Any]] = {
    "model": ((str,), None),
    "data": ((dict,), None),
    "method": ((str,), "advi"),
    "method_options": ((dict,), {}),
    "n": ((int, type(None)), 10_000),  # null (or auto): until converged
    "max_n": ((int, type(None)), None),  # with n: null, the most steps
    "tol": ((int, float, type(None)), None),  # with n: null, how closely phases agree
    "start": ((str, dict, type(None)), None),  # map, or initial values by variable
    "start_sigma": ((dict, type(None)), None),  # initial sds by variable (unconstrained)
    "optimizer": ((dict,), {"name": "adam", "learning_rate": 0.01}),
    "obj_n_mc": ((int, type(None)), None),
    "total_grad_norm_constraint": ((int, float, type(None)), None),
    "batch_size": ((int, type(None)), None),
    "num_workers": ((int,), 1),
    "backend": ((str, type(None)), None),
    "address": ((str, type(None)), None),
    "local": ((dict, type(None)), None),  # local variables: {variable: integer data column}
    "store": ((str, type(None)), None),  # "{timestamp}" in it: a new store for each run
    "checkpoint_every": ((int, type(None)), None),
    "tracking": ((bool, dict), False),
    "seed": ((int,), 1),
    "progress": ((str, bool), "auto"),  # YAML reads off/on as false/true
    "average_from": ((float, int, type(None)), None),  # fraction of n (float) or steps (int)
    "diagnose": ((int, bool), False),  # PSIS draws after the fit (true: 1000)
}
DATA: dict[str, tuple[tuple, Any]] = {
    "kind": ((str,), None),
    "loader": ((str,), None),
    "options": ((dict,), {}),
    "path": ((str, list), None),
    "arrays": ((list, type(None)), None),
    "columns": ((dict, list, type(None)), None),
}
TRACKING: dict[str, tuple[tuple, Any]] = {
    "experiment": ((str,), "distvi"),
    "run_name": ((str, type(None)), None),
    "tracking_uri": ((str, type(None)), None),
    "log_every": ((int,), 100),
    "max_store_mb": ((int, float), 50.0),
}
METHOD_OPTIONS = {
    "advi": {"beta": (int, float), "stl": (bool,)},
    "fullrank_advi": {"beta": (int, float), "stl": (bool,)},
    "svgd": {"n_particles": (int,), "jitter": (int, float), "temperature": (int, float),
             "shard_kernel_above": (int, float)},
    "asvgd": {"temperature": (int, float), "shard_kernel_above": (int, float)},
}


def _is(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # YAML true is not an int here
    return isinstance(value, types)


def _check_keys(where: str, given: Mapping, allowed: Mapping) -> None:
    for key in given:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


def _fill(where: str, given: Mapping, schema: Mapping[str, tuple[tuple, Any]]) -> dict[str, Any]:
    _check_keys(where, given, schema)
    out = {}
    for key, (types, default) in schema.items():
        value = given.get(key, default)
        name = f"{where}.{key}" if where != "config" else key
        if value is None and type(None) not in types and key in given and default is not None:
            raise ConfigError(f"{name} must be {_type_name(types)}, got null")
        if value is not None:
            _check_value(name, value, types)
        out[key] = value
    return out


def _check_value(name: str, value, types) -> None:
    if not _is(value, types):
        raise ConfigError(f"{name} must be {_type_name(types)}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ConfigError(f"{name} is too large: {value} (at most {MAX_INT})")


def _positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not value >= 1:
        raise ConfigError(f"{name} must be >= 1, got {value!r}")


def check_ref(name: str, ref: Any) -> str:
    """A ``module:function`` reference (checked by form here, imported at run time)."""
    if not isinstance(ref, str) or not REF.match(ref):
        raise ConfigError(f"{name} must be a reference 'module:function' (e.g. "
                          f"'jobs.quickstart:model'), got {ref!r}")
    return ref


def resolve(ref: str, name: str = "model") -> Callable:
    """Import ``module:function``; the current directory is on the path (jobs/ live there)."""
    import sys

    module, _, attr = check_ref(name, ref).partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{name}: cannot import {ref!r} ({type(err).__name__}: {err})") from None
    if not callable(obj):
        raise ConfigError(f"{name}: {ref!r} is not callable")
    return obj


def validate(raw: Any, base_dir: str | Path = ".") -> dict[str, Any]:
    """A complete, checked config from a parsed YAML mapping (paths relative to ``base_dir``
    are kept as given but must exist)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config is a mapping of keys to values, got {type(raw).__name__}")
    raw = {**raw, "n": _steps_or_until(raw.get("n", TOP["n"][1]))}
    if raw["n"] is None and "optimizer" not in raw:  # fit(n=None)'s default first rate
        from distvi.convergence import LEARNING_RATE

        raw["optimizer"] = {"name": "adam", "learning_rate": LEARNING_RATE}
    cfg = _fill("config", raw, TOP)
    if cfg["model"] is None:
        raise ConfigError("model is required: a reference 'module:function' to a model factory")
    check_ref("model", cfg["model"])
    if cfg["data"] is None:
        raise ConfigError(f"data is required: a mapping with kind ({', '.join(DATA_KINDS)})")
    data = _fill("data", cfg["data"], DATA)
    if data["kind"] not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got {data['kind']!r}")
    if data["kind"] == "loader":
        if data["loader"] is None:
            raise ConfigError("data.loader is required for kind 'loader': 'module:function'")
        check_ref("data.loader", data["loader"])
    else:
        if data["path"] is None:
            raise ConfigError(f"data.path is required for kind {data['kind']!r}")
        paths = data["path"] if isinstance(data["path"], list) else [data["path"]]
        for p in paths:
            if not isinstance(p, str):
                raise ConfigError(f"data.path must be a string or a list of strings, got {p!r}")
            if "://" not in p and not (Path(base_dir) / p).exists():
                raise ConfigError(f"data.path: {p!r} does not exist")
    cfg["data"] = data
    method = cfg["method"].lower()
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg['method']!r}")
    cfg["method"] = method
    allowed = METHOD_OPTIONS[method]
    _check_keys(f"method_options (for {method})", cfg["method_options"], allowed)
    for key, value in cfg["method_options"].items():
        _check_value(f"method_options.{key}", value, allowed[key])
    if cfg["method_options"].get("n_particles", 1) > 100_000:
        raise ConfigError(f"method_options.n_particles must be <= 100000, got "
                          f"{cfg['method_options']['n_particles']}")
    opt = dict(cfg["optimizer"])
    name = opt.pop("name", "adam")
    decay = opt.pop("decay", None)
    if decay is not None:
        if not isinstance(decay, dict):
            raise ConfigError(f"optimizer.decay must be a mapping {{to: ..., start: ...}}, got {decay!r}")
        _check_keys("optimizer.decay", decay, {"to": 0, "start": 0})
        to, start = decay.get("to"), decay.get("start", 0.5)
        if not (_is(to, (int, float)) and 0 < to < math.inf):
            raise ConfigError(f"optimizer.decay.to must be a learning rate > 0, got {to!r}")
        if not (_is(start, (int, float)) and 0 <= start < 1):
            raise ConfigError(f"optimizer.decay.start must be a fraction of n in [0, 1), got {start!r}")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    from distvi import optimizers

    try:
        optimizers.Optimizer(name, {**optimizer_defaults(name), **opt})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer: {err}") from None
    cfg["optimizer"] = {"name": name, **opt, **({"decay": decay} if decay is not None else {})}
    _positive("n", cfg["n"])
    _check_until(cfg)
    _check_start(cfg)
    from distvi._validate import MAX_STEPS

    for key, most in (("n", MAX_STEPS), ("max_n", MAX_STEPS), ("num_workers", 10_000),
                      ("obj_n_mc", 100_000)):
        if cfg[key] is not None and cfg[key] > most:
            raise ConfigError(f"{key} must be <= {most}, got {cfg[key]}")
    for key in ("obj_n_mc", "batch_size", "checkpoint_every"):
        _positive(key, cfg[key])
    _positive("num_workers", cfg["num_workers"], allow_none=False)
    if cfg["total_grad_norm_constraint"] is not None and not cfg["total_grad_norm_constraint"] > 0:
        raise ConfigError(f"total_grad_norm_constraint must be > 0, got {cfg['total_grad_norm_constraint']}")
    if cfg["local"] is not None and not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in cfg["local"].items()):
        raise ConfigError(f"local must map variable names to data column names (e.g. "
                          f"local: {{a: user}}), got {cfg['local']!r}")
    if cfg["backend"] not in (None, "local", "ray"):
        raise ConfigError(f"backend must be local or ray, got {cfg['backend']!r}")
    if cfg["seed"] < 0:
        raise ConfigError(f"seed must be >= 0, got {cfg['seed']}")
    if isinstance(cfg["progress"], bool):
        cfg["progress"] = "auto" if cfg["progress"] else "off"
    if cfg["progress"] not in PROGRESS:
        raise ConfigError(f"progress must be one of {', '.join(PROGRESS)}, got {cfg['progress']!r}")
    if cfg["checkpoint_every"] is not None and cfg["store"] is None:
        raise ConfigError("checkpoint_every needs a store")
    from distvi import _validate

    try:
        if cfg["n"] is not None:
            _validate.average_from(cfg["average_from"], cfg["n"])
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if cfg["diagnose"] is True:
        cfg["diagnose"] = 1000
    if cfg["diagnose"] is not False and not 100 <= cfg["diagnose"] <= 10**6:
        raise ConfigError(f"diagnose must be true/false or a number of draws in [100, 1e6], "
                          f"got {cfg['diagnose']}")
    if cfg["diagnose"] and cfg["method"] in ("svgd", "asvgd"):
        raise ConfigError("diagnose needs the density of q: SVGD's particles have none")
    if isinstance(cfg["tracking"], dict):
        cfg["tracking"] = _fill("tracking", cfg["tracking"], TRACKING)
        _positive("tracking.log_every", cfg["tracking"]["log_every"], allow_none=False)
    return cfg


def _steps_or_until(n: Any) -> int | None:
    """``n`` as given, ``None`` for ``null`` and ``auto`` (until converged)."""
    if n is None or (isinstance(n, str) and n.strip().lower() == "auto"):
        return None
    if not _is(n, (int,)):
        raise ConfigError(f"n must be an int (the number of steps), or null or auto (run until "
                          f"converged), got {type(n).__name__} {n!r}")
    return n


def _check_until(cfg: dict[str, Any]) -> None:
    """``max_n`` and ``tol`` go with ``n: null``, a schedule and ``average_from`` do not."""
    if cfg["n"] is not None:
        for key in ("max_n", "tol"):
            if cfg[key] is not None:
                raise ConfigError(f"{key} applies to a fit run until it converges: set n: null "
                                  f"(or auto), or drop {key} (n is {cfg['n']})")
        return
    _positive("max_n", cfg["max_n"])
    if cfg["tol"] is not None and not 0 < cfg["tol"] < 1:
        raise ConfigError(f"tol must be a number in (0, 1) (posterior sds between successive "
                          f"phases), got {cfg['tol']!r}")
    if cfg["average_from"] is not None:
        raise ConfigError("average_from is for a fixed n: with n: null the fit averages each of "
                          "its phases itself; drop average_from")
    if cfg["optimizer"].get("decay") is not None:
        raise ConfigError("optimizer.decay is a learning-rate schedule, and n: null sets the "
                          "rate itself (halving it between phases): drop optimizer.decay and "
                          "give a constant learning_rate (the first phase's)")


def _check_start(cfg: dict[str, Any]) -> None:
    """``start`` (``map`` or values by variable) and ``start_sigma`` (sds by variable), by
    form; the variables' names and shapes are checked against the model when it is built."""
    method, start, sigma = cfg["method"], cfg["start"], cfg["start_sigma"]
    if start is not None:
        if method == "asvgd":
            raise ConfigError("start does not apply to method asvgd (its approximation holds "
                              "the start); drop start")
        if isinstance(start, str) and start != "map":
            raise ConfigError(f"start must be map or a mapping of variable names to initial "
                              f"values, got {start!r}")
        if isinstance(start, dict):
            for key, value in start.items():
                _check_numbers(f"start.{key}", key, value, positive=False)
    if sigma is not None:
        if method not in ("advi", "fullrank_advi"):
            raise ConfigError(f"start_sigma applies to advi and fullrank_advi, not {method}; "
                              f"drop start_sigma")
        for key, value in sigma.items():
            _check_numbers(f"start_sigma.{key}", key, value, positive=True)


def _check_numbers(name: str, key: Any, value: Any, positive: bool) -> None:
    """A variable's value: a finite number (> 0 for an sd) or a (nested) list of them."""
    if not isinstance(key, str):
        raise ConfigError(f"{name.partition('.')[0]}: keys are variable names, got {key!r}")

    def ok(v) -> bool:
        if isinstance(v, list):
            return bool(v) and all(ok(x) for x in v)
        return _is(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)

    if not ok(value):
        what = "a number > 0 (an sd) or a list of them" if positive else "a number or a list of numbers"
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def optimizer_defaults(name: str) -> dict[str, Any]:
    """The optimizer's own defaults (as ``distvi.<name>()`` sets them)."""
    from distvi import optimizers

    return dict(getattr(optimizers, name)().hyper)


def load(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read, safe-load, apply ``--set key=value`` overrides (dotted keys, YAML values) and
    validate a config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML for safe loading: {err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = validate(raw, base_dir=".")
    if cfg["store"] and "{timestamp}" in cfg["store"]:  # a new store for each run of a config
        import time

        cfg["store"] = cfg["store"].replace("{timestamp}", time.strftime("%Y%m%d-%H%M%S"))
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """``key.sub=value`` with a YAML value (``--set n=500``, ``--set optimizer.learning_rate=0.02``)."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: not a valid YAML value: {err}") from None
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {key}: {part!r} is not a mapping")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build_source(data: dict[str, Any]):
    """The data source a validated ``data`` section names (a loader is imported and called).

    Data that cannot be used as given (a Parquet column or Zarr array that is not there, a
    file that does not open) is a :class:`ConfigError` naming the ``data`` key at fault."""
    from distvi.data import DataError

    try:
        return _build_source(data)
    except DataError as err:
        key = "data.loader" if data["kind"] == "loader" else f"data.{err.field or 'path'}"
        raise ConfigError(f"{key}: {err}") from None


def _build_source(data: dict[str, Any]):
    from distvi.data import ArraySource, DataError, ParquetSource, ZarrSource

    kind = data["kind"]
    if kind == "loader":
        arrays = resolve(data["loader"], "data.loader")(**data["options"])
        return ArraySource(arrays)
    if kind == "npz":
        import numpy as np

        with np.load(data["path"], allow_pickle=False) as f:
            names = data["arrays"] or list(f.files)
            missing = [k for k in names if k not in f.files]
            if missing:
                raise DataError(f"the file {data['path']!r} has no array {missing[0]!r}; it has "
                                f"{list(f.files)}", "arrays")
            return ArraySource({k: f[k] for k in names})
    if kind == "zarr":
        return ZarrSource(data["path"], arrays=data["arrays"])
    return ParquetSource(data["path"], columns=data["columns"])
