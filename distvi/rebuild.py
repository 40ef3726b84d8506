"""Rebuilding a run from its store alone: what ``resume(store)`` needs without ``model=`` and
``data=``. The store records the model factory as an importable ``module:qualname`` (or why it
is not one) and the data as a Zarr or Parquet source by path (in-memory arrays by name and
shape only: a store does not hold them).
"""

from __future__ import annotations

from typing import Any

from distvi.store import StoreError


def model_reference(model: Any) -> tuple[str | None, str | None]:
    """``("module:qualname", None)`` for a model factory another process can import, else
    ``(None, why not)``."""
    import sys

    import pymc as pm

    if model is None or isinstance(model, pm.Model):
        return None, ("the run's model was a ready pm.Model, which is not importable by "
                      "reference: pass model= (the same pm.Model)")
    module, qual = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qual, str)):
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        return None, (f"the run's model factory (a {kind} object) is not a function defined in a "
                      "module (it has no module and qualified name), so it is not importable by "
                      "name: pass model=")
    what = f"the run's model factory {qual!r}"
    if module == "__main__":
        return None, (f"{what} is defined in __main__ (a script, notebook or the interpreter), "
                      "which another process cannot import: define it in a module, or pass model=")
    if "<lambda>" in qual:
        return None, f"{what} (in {module}) is a lambda, which is not importable by name"
    if "<locals>" in qual:
        return None, (f"{what} (in {module}) is defined inside a function (a closure), which "
                      "is not importable by name: define it at module level, or pass model=")
    obj = sys.modules.get(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if obj is None or not (obj is model or obj == model):
        return None, (f"{what}: {module}:{qual} does not import to it (a method of an object, "
                      "or a decorated or replaced function), so it is not importable by name")
    return f"{module}:{qual}", None


def rebuild_description(model: Any, source: Any) -> dict[str, Any]:
    """The ``rebuild`` attribute of a run store (see :func:`rebuilt_model_and_data`)."""
    import os

    from distvi.data import ArraySource, ParquetSource, ZarrSource

    def where(path: str) -> str:  # a relative path from wherever the run is resumed
        return path if "://" in path else os.path.abspath(path)

    ref, why = model_reference(model)
    if type(source) is ZarrSource:
        data = {"kind": "zarr", "path": where(source.path), "arrays": list(source.schema())}
    elif type(source) is ParquetSource:
        data = {"kind": "parquet", "paths": [where(p) for p in source.paths],
                "columns": source.columns}
    elif type(source) is ArraySource:
        data = {"kind": "arrays", "arrays": {k: [str(v.dtype), list(v.shape)]
                                             for k, v in source.arrays.items()}}
    else:
        data = {"kind": str(source.describe().get("kind", "")), "type": type(source).__qualname__}
    return {"model": ref, "model_why": why, "data": data}


def import_ref(url: str, ref: str):
    import importlib
    import os
    import sys

    module, _, qual = ref.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as a config's references: jobs/ in the working directory
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception as err:
        raise StoreError(f"resume({url!r}) cannot import the run's model factory {ref!r} "
                         f"({type(err).__name__}: {err}): pass model=") from None
    return obj


def rebuilt_model_and_data(url: str, attrs: dict[str, Any], model: Any, data: Any):
    """``model`` and ``data`` for resuming the run in the store at ``url``: those given, else
    the model factory imported by the reference the store records, and a Zarr or Parquet
    source opened again by the path it records (credentials that were masked there come from
    the environment, as for ``distvi resume``). Refused, saying what to pass, when the store
    records no importable factory or the data were in-memory arrays."""
    import pymc as pm

    from distvi.redact import strip_masked

    rebuild = attrs.get("rebuild")
    if model is None:
        if rebuild is None:
            raise StoreError(f"resume({url!r}) needs model=: the store records no model reference "
                             f"(it was written by an older distvi)")
        if rebuild.get("model") is None:
            raise StoreError(f"resume({url!r}) needs model=: {rebuild.get('model_why')}")
        model = import_ref(url, rebuild["model"])
    if data is not None or isinstance(model, pm.Model):
        return model, data
    if rebuild is None:
        raise StoreError(f"resume({url!r}) needs data=: the store records no data reference "
                         f"(it was written by an older distvi)")
    desc = strip_masked(rebuild["data"])
    kind = desc.get("kind")
    from distvi.data import DataError, ParquetSource, ZarrSource

    try:
        if kind == "zarr":
            return model, ZarrSource(desc["path"], arrays=desc.get("arrays"))
        if kind == "parquet":
            return model, ParquetSource(desc["paths"], columns=desc.get("columns"))
    except DataError as err:
        raise StoreError(f"resume({url!r}) cannot open the run's data again ({err}): pass "
                         f"data=") from None
    if kind == "arrays":
        arrays = ", ".join(f"{k} {tuple(shape)} {dtype}"
                           for k, (dtype, shape) in desc.get("arrays", {}).items())
        hint = " (or run 'distvi resume', which loads them as its config says)" if attrs.get("job") else ""
        raise StoreError(f"resume({url!r}) needs data=: the run's data were in-memory arrays "
                         f"({arrays}), which a run store does not hold; pass data= with the same "
                         f"arrays{hint}")
    raise StoreError(f"resume({url!r}) needs data=: the run's data were a "
                     f"{desc.get('type', kind)!r} source, which distvi cannot open again by itself")
