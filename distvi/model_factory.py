"""Calling a user's model factory ``model(data) -> pm.Model`` with symbolic minibatch rows.

The factory is given the rows by name; a key it reads that the data lacks, an exception in
its code, and an array of the data's full rows used where the minibatch rows belong are
reported as errors that name the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pymc as pm
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.traversal import ancestors
from pytensor.tensor.basic import Alloc
from pytensor.tensor.shape import SpecifyShape

from distvi.model_errors import ModelError, ModelFactoryError
from distvi.model_terms import DataSchema
from distvi.pymc_models import check_discrete, depends_on, plain_model, value_of

ModelFactory = Callable[[Mapping[str, Any]], pm.Model]


def factory_name(factory: Callable) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


class _MissingDataKey(KeyError):
    """A model factory read a key the data does not have (:func:`model_from_factory` names it)."""


class _FactoryData(dict):
    """The mapping a model factory is given: the symbolic minibatch rows by name. A key that
    is not there raises a KeyError subclass (a factory may catch KeyError for optional keys);
    uncaught, :func:`model_from_factory` turns it into a :class:`ModelError`."""

    def __missing__(self, key):
        raise _MissingDataKey(key)


def _shape_inputs(node) -> set[int]:
    """Input positions of ``node`` that hold a shape, not values (``reshape((-1, 2))``, the
    shape of an ``alloc``, a random variable's size)."""
    from pytensor.tensor.random.op import RandomVariable
    from pytensor.tensor.shape import Reshape

    op = node.op
    if isinstance(op, Reshape):
        return {1}
    if isinstance(op, Alloc | SpecifyShape):
        return set(range(1, len(node.inputs)))
    if isinstance(op, RandomVariable):
        return {1}
    return set()


def _full_row_arrays(model: pm.Model, inputs: Mapping[str, Variable],
                     trailing: Mapping[str, tuple[int, ...]], n_rows: int) -> list:
    """Constants and shared variables of ``n_rows`` rows used as values in the data term of a
    factory's model (its observed variables and the potentials that touch the rows): the
    full data where the minibatch rows (``data[key]``) belong. An array whose whole shape is
    a trailing shape of the data, up to length-1 axes (per-column weights, say, when there
    are as many columns as rows, which PyTensor may hold as a column (K, 1)), is left alone,
    and so are shapes (``reshape((-1, 2))`` with two rows)."""
    if n_rows <= 1:
        return []
    row_vars = set(inputs.values())
    terms = [*model.observed_RVs, *(p for p in model.potentials if depends_on(p, row_vars))]
    if not terms:
        return []
    try:
        graph = model.logp(vars=terms)
    except Exception:  # the adapter reports what is wrong with such a model
        return []
    values = [model.rvs_to_values[o] for o in model.observed_RVs]
    observed_of = {model.rvs_to_values[o]: o.name for o in model.observed_RVs}
    def core(shape) -> tuple[int, ...]:
        return tuple(int(d) for d in shape if d != 1)

    column_shapes = {core(t) for t in trailing.values()}
    found = {}
    for v in ancestors([graph, *values]):
        if v.owner is None:
            continue
        shapes = _shape_inputs(v.owner)
        for i, inp in enumerate(v.owner.inputs):
            if i in shapes or inp in found or not isinstance(inp, Constant | SharedVariable):
                continue
            value = value_of(inp)
            if np.ndim(value) >= 1 and np.shape(value)[0] == n_rows \
                    and core(np.shape(value)) not in column_shapes:
                found[inp] = tuple(np.shape(value))
    for v in values:  # an observed full array is the value itself
        if v not in found and isinstance(v, Constant | SharedVariable):
            value = value_of(v)
            if np.ndim(value) >= 1 and np.shape(value)[0] == n_rows \
                    and core(np.shape(value)) not in column_shapes:
                found[v] = tuple(np.shape(value))
    def label(v: Variable) -> str:
        if v in observed_of:
            return f"the observed values of {observed_of[v]!r}, "
        return f"{v.name!r}, " if v.name else ""

    return [(label(v), shape) for v, shape in found.items()]


def _full_rows_message(factory: Callable, arrays: list, trailing: Mapping[str, tuple[int, ...]],
                       n_rows: int) -> str:
    parts = []
    for label, shape in arrays:
        keys = [k for k, t in trailing.items() if tuple(t) == shape[1:]] or list(trailing)
        use = " or ".join(f"data[{k!r}]" for k in keys)
        parts.append(f"the model uses an array of {n_rows} rows ({label}shape {shape}) directly; "
                     f"use {use} (the minibatch rows)")
    return (f"model factory {factory_name(factory)!r}: " + "; ".join(dict.fromkeys(parts)) +
            f": distvi calls the factory with each step's minibatch rows, not the {n_rows} rows "
            "of the data")


def model_from_factory(factory: ModelFactory, schema: DataSchema,
                       n_rows: int | None = None) -> tuple[pm.Model, dict]:
    """``factory(data)`` called with symbolic minibatch rows: the model (without
    ``total_size``, checked against the rows) and the row inputs (name -> variable).

    A key the factory reads that is not in the data, and (given the data's ``n_rows``)
    an array of the data's full rows in the model's data term where ``data[key]`` belongs,
    are :class:`ModelError` s naming them."""
    inputs = schema.inputs()
    try:
        model = factory(_FactoryData(inputs))
    except _MissingDataKey as err:
        raise ModelError(
            f"model factory {factory_name(factory)!r} reads data[{err.args[0]!r}], which is "
            f"not in the data; the data has keys {list(inputs)}"
        ) from None
    except Exception as err:  # the user's code: say whose it was
        raise ModelFactoryError(
            f"model factory {factory_name(factory)!r} raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, pm.Model):
        raise TypeError(
            f"model factory {factory_name(factory)!r} must return a pymc.Model, "
            f"got {type(model).__name__}"
        )
    if n_rows is not None:
        trailing = {name: t for name, _, t in schema.columns}
        full = _full_row_arrays(model, inputs, trailing, int(n_rows))
        if full:
            raise ModelError(_full_rows_message(factory, full, trailing, int(n_rows)))
    check_discrete(model)
    # total_size: checked against the rows, and dropped
    model, _ = plain_model(model, n_rows, list(inputs.values()))
    return model, inputs
