"""A user's ready PyMC model rebuilt for sharding.

Its row-aligned data (observed arrays, ``pm.Data``, the arrays ``pm.Minibatch`` views)
become symbolic minibatch inputs; ``pm.Minibatch`` and ``total_size`` are taken out, since
distvi draws the minibatches and scales each by its shard's rows itself; discrete free
variables and free variables that grow with the rows are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.rewriting.utils import rewrite_graph
from pytensor.graph.traversal import ancestors, io_toposort
from pytensor.tensor.basic import Alloc
from pytensor.tensor.shape import SpecifyShape

try:  # PyMC's minibatch pieces (pm.Minibatch and total_size)
    from pymc.data import MinibatchOp
    from pymc.variational.minibatch_rv import MinibatchRandomVariable
except ImportError:  # pragma: no cover - other PyMC layouts
    MinibatchOp = MinibatchRandomVariable = ()

from distvi.data import check_array
from distvi.model_errors import DiscreteVariableError, ModelError


def depends_on(var: Variable, targets: set[Variable]) -> bool:
    return any(a in targets for a in ancestors([var]))


def value_of(v: Variable) -> np.ndarray:
    if isinstance(v, SharedVariable):
        return v.get_value(borrow=True)
    if isinstance(v, Constant):
        return v.data
    raise ModelError(f"observed data {v} is neither a constant nor a pm.Data container")


def check_discrete(model: pm.Model) -> None:
    """Discrete free variables are refused first, before any check of the data."""
    for rv in model.free_RVs:
        if rv.dtype.startswith(("int", "uint", "bool")):
            raise DiscreteVariableError(
                f"free variable {rv.name!r} is discrete ({rv.dtype}); distvi's variational "
                "inference needs continuous free variables: marginalise it out of the model "
                "(e.g. a mixture likelihood over its values), or sample the model with PyMC's "
                "samplers (pm.sample)"
            )


def folded(graph: Variable) -> Variable:
    """``graph`` rewritten (constants folded), without the notes rewriting a bare graph gives."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rewrite_graph(graph, include=("fast_run",))


def row_sized_free_rvs(model: pm.Model, row_vars: set[Variable]) -> list:
    """The free variables whose size or parameters depend on the data rows."""
    out = []
    for rv in model.free_RVs:
        params = [i for i in rv.owner.inputs if not isinstance(i.type, pt.random.type.RandomType)]
        # a trailing dimension of the data (data["X"].shape[1]) is static: folding the
        # graph removes it, while the row count or data values stay
        if row_vars and any(depends_on(p, row_vars) and depends_on(folded(p), row_vars)
                            for p in params):
            out.append(rv)
    return out


def check_global_free_rvs(model: pm.Model, row_vars: set[Variable], per_row: tuple = ()) -> None:
    """Free variables whose number would grow with the rows are refused (as are discrete
    ones), but for ``per_row`` (those made per-row local variables)."""
    check_discrete(model)
    for rv in row_sized_free_rvs(model, row_vars):
        if rv not in per_row:
            raise ModelError(
                f"free variable {rv.name!r} has a size or parameters that depend on the data "
                "rows; a global variable's must not (a variable whose first axis is the rows, "
                "shape=data[...].shape[0], is a per-row local variable)"
            )


@dataclass
class RowData:
    """A ready model rebuilt for sharding: its row-aligned arrays become symbolic inputs."""

    model: pm.Model                          # without pm.Minibatch and total_size
    inputs: dict[str, pt.TensorVariable]     # the minibatch rows, by name
    replace: dict[Variable, Variable]        # what in the model's graph each input stands for
    arrays: dict[str, np.ndarray]            # the rows to shard, by name (empty: no data)
    batch_size: int | None                   # the rows per step pm.Minibatch asks for


def find_row_data(model: pm.Model) -> RowData:
    """The rows of a ready model to shard, and the model rebuilt to read them as inputs.

    ``pm.Minibatch`` views are replaced by their source arrays (the rows to shard), and
    ``total_size`` is checked against the rows and dropped: the workers scale each minibatch
    by their own rows. A model without observed data has no rows (it is fitted on the
    driver alone)."""
    check_discrete(model)
    if not model.observed_RVs:
        return RowData(model, {}, {}, {}, None)
    values = [model.rvs_to_values[o] for o in model.observed_RVs]
    minibatches = _minibatch_nodes([*values, *model.deterministics, *model.potentials])
    lengths = {}
    for v in values:
        arr = value_of(_source_of(v))
        if arr.ndim >= 1:
            lengths[_name_of(model, v)] = int(arr.shape[0])
    for node in minibatches:
        for i in node.inputs[:-1]:
            lengths.setdefault(_name_of(model, i), int(value_of(i).shape[0]))
    if len(set(lengths.values())) > 1:
        raise ModelError(
            "observed data (and pm.Minibatch arrays) must share one leading (row) dimension; "
            f"got {lengths}"
        )
    if not lengths:
        raise ModelError("the observed data are scalars: there are no rows to shard")
    n_rows = next(iter(lengths.values()))
    batch = _minibatch_size(minibatches)
    model, views = plain_model(model, n_rows)
    values = [model.rvs_to_values[o] for o in model.observed_RVs]
    graph = model.logp(vars=model.observed_RVs)
    # (graph variable, the array it stands for): full-row constants and pm.Data, and the
    # stand-ins of pm.Minibatch views
    found = []
    for v in ancestors([graph, *values, *model.deterministics]):
        if v in views:
            found.append((v, views[v]))
        elif isinstance(v, Constant | SharedVariable) and getattr(v, "ndim", 0) >= 1 \
                and value_of(v).shape[0] == n_rows:
            found.append((v, v))
    names = {v: k for k, v in model.named_vars.items()}
    for o in model.observed_RVs:
        names.setdefault(model.rvs_to_values[o], o.name)
    arrays, replace, inputs, by_array = {}, {}, {}, {}
    for i, (var, src) in enumerate(dict.fromkeys(found)):
        value = value_of(src)
        key = id(value)
        if key not in by_array:
            name = names.get(var) or names.get(src) or src.name or var.name or f"data_{i}"
            if not name.isidentifier() or name in arrays:
                name = f"data_{i}"
            arr = check_array(name, np.asarray(value))
            by_array[key] = pt.tensor(name=name, dtype=arr.dtype, shape=(None, *arr.shape[1:]))
            arrays[name], inputs[name] = arr, by_array[key]
        replace[var] = by_array[key]
    for rv in model.free_RVs:
        shape = model.initial_point()[model.rvs_to_values[rv].name].shape
        if n_rows > 1 and n_rows in shape:
            raise ModelError(
                f"free variable {rv.name!r} has a dimension of length {n_rows}, the number of "
                "rows; distvi fits global parameters only (their number must not grow with "
                "the rows)"
            )
    return RowData(model, inputs, replace, arrays, batch)


def _minibatch_nodes(graphs) -> list:
    """The ``pm.Minibatch`` nodes the graphs read from."""
    return list(dict.fromkeys(
        v.owner for v in ancestors(list(graphs))
        if v.owner is not None and isinstance(v.owner.op, MinibatchOp)))


def _source_of(v: Variable) -> Variable:
    """For a ``pm.Minibatch`` output, the array it draws rows from; else ``v`` (both through
    the dtype casts PyMC puts on observed data, e.g. int32 rows of a Bernoulli)."""
    from pytensor.scalar.basic import Cast
    from pytensor.tensor.elemwise import Elemwise

    while (v.owner is not None and isinstance(v.owner.op, Elemwise)
           and isinstance(v.owner.op.scalar_op, Cast)):
        v = v.owner.inputs[0]
    if v.owner is not None and isinstance(v.owner.op, MinibatchOp):
        return v.owner.inputs[v.owner.outputs.index(v)]
    return v


def _name_of(model: pm.Model, v: Variable) -> str:
    for k, var in model.named_vars.items():
        if var is v:
            return k
    for o in model.observed_RVs:
        if model.rvs_to_values[o] is v:
            return o.name
    return v.name or str(v)


def _minibatch_size(nodes) -> int | None:
    """The rows per step the ``pm.Minibatch`` calls ask for (they must agree)."""
    sizes = set()
    for node in nodes:
        size = node.outputs[0].type.shape[0]
        if size is None:  # not static: read it from the index draw inside the Minibatch
            inner = [n for n in node.op.fgraph.apply_nodes
                     if isinstance(getattr(n.op, "name", None), str) and "integers" in n.op.name]
            consts = [i.data for n in inner for i in n.inputs if isinstance(i, Constant)
                      and np.ndim(i.data) == 1]
            size = int(consts[0][0]) if consts else None
        if size is not None:
            sizes.add(int(size))
    if len(sizes) > 1:
        raise ModelError(f"the model's pm.Minibatch calls ask for different batch sizes "
                         f"{sorted(sizes)}; use one batch_size for all of them")
    return sizes.pop() if sizes else None


def _total_size_rows(obs) -> int | None:
    """The leading ``total_size`` of an observed variable (None when not set)."""
    first, *rest = obs.owner.inputs[1:] or [None]
    for t in rest:
        if isinstance(t, Constant) and t.data is not None:
            raise ModelError(f"observed variable {obs.name!r} has a total_size beyond its first "
                             "(row) dimension; distvi scales rows only")
    if first is None or not isinstance(first, Constant) or first.data is None:
        if first is not None and not isinstance(first, Constant):
            raise ModelError(f"observed variable {obs.name!r} has a symbolic total_size; give "
                             "it as an int")
        return None
    return int(first.data)


def plain_model(model: pm.Model, n_rows: int | None, inputs=()) -> tuple[pm.Model, dict]:
    """``model`` without its minibatch pieces, and the stand-ins of its views: each
    ``pm.Minibatch`` view becomes a stand-in (mapped to the array it views, whose rows the
    shards hold), and ``total_size`` is dropped after checking that it equals the rows given (distvi draws the
    minibatches and scales each by its shard's rows itself; a second scale would count the
    data twice). A model with neither is returned as it is."""
    marked = [o for o in model.observed_RVs if isinstance(o.owner.op, MinibatchRandomVariable)]
    minibatches = _minibatch_nodes([*model.observed_RVs, *model.deterministics,
                                    *model.potentials, *model.rvs_to_values.values()])
    views: dict[Variable, Variable] = {}
    if not (marked or minibatches):
        return model, views
    for obs in marked:
        total = _total_size_rows(obs)
        if total is not None and n_rows is not None and total != n_rows:
            raise ModelError(
                f"observed variable {obs.name!r} has total_size={total}, but the data given has "
                f"{n_rows} rows: distvi draws the minibatches and scales each by its shard's rows "
                f"itself, so total_size must be the number of rows given ({n_rows}) or left out"
            )
    from pymc.model.fgraph import fgraph_from_model, model_from_fgraph

    # PyMC's conversion refuses initial values: set them aside, and on the rebuilt model again
    initvals = {rv.name: v for rv, v in model.rvs_to_initial_values.items() if v is not None}
    saved = dict(model.rvs_to_initial_values)
    try:
        model.rvs_to_initial_values = {rv: None for rv in saved}
        fgraph, memo = fgraph_from_model(model)
    finally:
        model.rvs_to_initial_values = saved
    # the rebuilt model reads copies of the graph's root inputs: keep the factory's row inputs
    # (the data term's inputs) as they are
    fgraph.replace_all([(memo[v], v) for v in inputs if v in memo and memo[v] is not v],
                       import_missing=True)
    for node in list(fgraph.toposort()):
        if isinstance(node.op, MinibatchRandomVariable):
            fgraph.replace(node.outputs[0], node.inputs[0], import_missing=True)
        elif isinstance(node.op, MinibatchOp):
            # a stand-in of the view's type, which the row inputs replace like a constant
            for out, full in zip(node.outputs[:-1], node.inputs[:-1]):
                stand_in = out.type()
                stand_in.name = full.name or out.name
                views[stand_in] = full
                fgraph.replace(out, stand_in, import_missing=True)
    rebuilt = model_from_fgraph(fgraph, mutate_fgraph=True)
    for name, value in initvals.items():
        rebuilt.set_initval(rebuilt[name], value)
    return rebuilt, views


def rebuild_with_rows(graph: Variable, replace: dict[Variable, Variable]) -> Variable:
    """``graph`` with the full-data arrays replaced by minibatch inputs of unknown length.

    A plain graph_replace keeps the old static types and pins the new inputs back to N rows
    (it inserts SpecifyShape); every node downstream of the data is rebuilt instead, so its
    output types are inferred afresh, and the model's own shape checks on row data go.
    """
    new: dict[Variable, Variable] = dict(replace)
    for node in io_toposort(list(replace), [graph]):
        inputs = [new.get(i, i) for i in node.inputs]
        if all(a is b for a, b in zip(inputs, node.inputs)):
            continue
        if isinstance(node.op, SpecifyShape) or (
            isinstance(node.op, Alloc) and inputs[0].ndim == node.outputs[0].ndim
        ):
            new[node.outputs[0]] = inputs[0]
            continue
        rebuilt = node.op.make_node(*inputs)
        new.update(zip(node.outputs, rebuilt.outputs))
    return new.get(graph, graph)
