"""The model adapter: a PyMC model seen as a prior term plus a data term over one flat vector.

This is one of the two modules that touch PyMC (the other is the worker). It turns either
a factory ``model(data) -> pm.Model`` or a ready ``pm.Model`` into:

- the flat unconstrained layout (value variables in PyMC's order, with shapes and slices),
- the prior term ``varlogp(z)``: free variables, their Jacobians and the potentials that do
  not touch the data, counted once on the driver,
- the data term ``datalogp(z; rows)``: observed variables and data-touching potentials,
  summed over the rows it is given, evaluated by the shard workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.traversal import ancestors, io_toposort
from pytensor.tensor.basic import Alloc
from pytensor.graph.replace import graph_replace, vectorize_graph
from pytensor.graph.rewriting.utils import rewrite_graph
from pytensor.tensor.shape import SpecifyShape

from distvi._compile import compile_mode, function
from distvi.data import check_array

ModelFactory = Callable[[Mapping[str, Any]], pm.Model]


class ModelError(ValueError):
    """The model cannot be fitted by distvi as written."""


class ModelFactoryError(RuntimeError):
    """The user's model factory raised while building the model."""


@dataclass(frozen=True)
class VarLayout:
    """Where one value variable lives in the flat unconstrained vector."""

    name: str
    rv_name: str
    shape: tuple[int, ...]
    start: int
    stop: int
    transform: str | None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class DataSchema:
    """Names, dtypes and trailing shapes of the row-aligned data arrays."""

    columns: tuple[tuple[str, str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> DataSchema:
        return cls(tuple((k, str(v.dtype), tuple(v.shape[1:])) for k, v in arrays.items()))

    def inputs(self) -> dict[str, pt.TensorVariable]:
        return {
            name: pt.tensor(name=name, dtype=dtype, shape=(None, *trailing))
            for name, dtype, trailing in self.columns
        }


def rows_of(graph: Variable, z: Variable, points: Variable, n_points: int):
    """``graph`` of the flat vector ``z`` evaluated at each row of ``points`` (S, D).

    For one point the plain graph is used: it compiles to faster code than the vectorised one.
    """
    if n_points == 1:
        return pt.shape_padleft(graph_replace(graph, {z: points[0]}, strict=False))
    return vectorize_graph(graph, {z: points})


@dataclass
class DataTerm:
    """The data term's graph: ``logp`` of the flat point ``z`` and the minibatch ``inputs``."""

    z: Variable
    logp: Variable
    inputs: list
    check_bounds: bool

    def compile(self, n_points: int, with_logp: bool = True, with_grad: bool = True) -> Callable:
        """``f(points[S, D], *rows, scale) -> (scale * datalogp[S], scale * grad[S, D])``;
        with ``with_logp=False`` only ``[scale * grad]`` (the log density's elementwise work,
        e.g. two softplus per row for a logistic likelihood, is then not done), with
        ``with_grad=False`` only ``[scale * datalogp]``."""
        if not (with_logp or with_grad):
            raise ValueError("a data term computes the log density, its gradient, or both")
        ndim = self.z.type.shape[0]
        points = pt.matrix("points", dtype="float64", shape=(n_points, ndim))
        scale = pt.scalar("scale", dtype="float64")
        outputs = []
        if with_grad:
            grad = pt.grad(self.logp, self.z) if ndim else pt.zeros((0,))
            outputs.append(scale * rows_of(grad, self.z, points, n_points))
        if with_logp:
            outputs.insert(0, scale * rows_of(self.logp, self.z, points, n_points))
        return function(
            [points, *self.inputs, scale],
            outputs,
            mode=compile_mode(self.check_bounds),
            trust_input=True,
            on_unused_input="ignore",
        )


def _factory_name(factory: Callable) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


def _depends_on(var: Variable, targets: set[Variable]) -> bool:
    return any(a in targets for a in ancestors([var]))


class ModelAdapter:
    """A PyMC model as (layout, prior term, data term).

    Build with :meth:`from_factory` or :meth:`from_model`; both give the same object.
    """

    def __init__(
        self, model: pm.Model, data_inputs: dict[str, pt.TensorVariable], replace: dict
    ) -> None:
        self.model = model
        self.data_inputs = data_inputs
        row_vars = set(replace) | set(data_inputs.values())
        for obs in model.observed_RVs:
            # PyMC would scale by total_size / B and the worker again by N_k / B_k
            if "MinibatchRandomVariable" in type(obs.owner.op).__name__ or getattr(
                    obs.tag, "total_size", None) is not None:
                raise ModelError(
                    f"observed variable {obs.name!r} uses pm.Minibatch/total_size: give distvi the "
                    "full data, it draws and scales the minibatches itself"
                )
        self._check_free_rvs(row_vars)

        point = model.initial_point()
        layout, start = [], 0
        for rv, vv in zip(model.free_RVs, model.value_vars):
            shape = tuple(int(s) for s in np.shape(point[vv.name]))
            size = int(np.prod(shape, dtype=int))
            tr = model.rvs_to_transforms.get(rv)
            layout.append(VarLayout(vv.name, rv.name, shape, start, start + size,
                                    None if tr is None else type(tr).__name__))
            start += size
        self.layout: tuple[VarLayout, ...] = tuple(layout)
        self.ndim = start
        self._initial = np.concatenate(
            [np.asarray(point[v.name], dtype="float64").ravel() for v in layout]
        ) if layout else np.zeros(0)

        data_potentials = [p for p in model.potentials if _depends_on(p, row_vars)]
        prior_potentials = [p for p in model.potentials if p not in data_potentials]
        self.z = pt.vector("z", dtype="float64", shape=(self.ndim,))
        to_z = self._value_replacements(self.z)
        prior = model.logp(vars=[*model.free_RVs, *prior_potentials], jacobian=True)
        data_terms = [*model.observed_RVs, *data_potentials]
        data = model.logp(vars=data_terms) if data_terms else pt.constant(0.0, dtype="float64")
        self.prior_logp = graph_replace(pt.cast(prior, "float64"), to_z, strict=False)
        data = _rebuild_with_rows(pt.cast(data, "float64"), replace) if replace else data
        self.data_logp = graph_replace(pt.cast(data, "float64"), to_z, strict=False)
        self._replace = replace

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_factory(cls, factory: ModelFactory, schema: DataSchema) -> ModelAdapter:
        """Call ``factory(data)`` with symbolic minibatch rows and adapt the model it returns."""
        inputs = schema.inputs()
        try:
            model = factory(dict(inputs))
        except Exception as err:  # the user's code: say whose it was
            raise ModelFactoryError(
                f"model factory {_factory_name(factory)!r} raised {type(err).__name__}: {err}"
            ) from err
        if not isinstance(model, pm.Model):
            raise TypeError(
                f"model factory {_factory_name(factory)!r} must return a pymc.Model, "
                f"got {type(model).__name__}"
            )
        return cls(model, inputs, {})

    @classmethod
    def from_model(cls, model: pm.Model) -> tuple[ModelAdapter, dict[str, np.ndarray]]:
        """Adapt a ready model: its row-aligned data become symbolic inputs.

        Returns the adapter and the row-aligned arrays (name -> array) to shard.
        """
        if not model.observed_RVs:
            raise ModelError("the model has no observed variables: there is no data to shard")
        values = [model.rvs_to_values[o] for o in model.observed_RVs]
        rows = {int(_value_of(v).shape[0]) for v in values if _value_of(v).ndim >= 1}
        if len(rows) != 1:
            raise ModelError(
                "observed variables must share one leading (row) dimension; got lengths "
                f"{sorted(rows)}"
            )
        n_rows = rows.pop()
        graph = model.logp(vars=model.observed_RVs)
        candidates = [
            v for v in ancestors([graph, *values])
            if isinstance(v, Constant | SharedVariable)
            and getattr(v, "ndim", 0) >= 1 and _value_of(v).shape[0] == n_rows
        ]
        names = {v: k for k, v in model.named_vars.items()}
        for o in model.observed_RVs:
            names.setdefault(model.rvs_to_values[o], o.name)
        arrays, replace, inputs, seen = {}, {}, {}, set()
        for i, v in enumerate(dict.fromkeys(candidates)):
            name = names.get(v) or v.name or f"data_{i}"
            if name in seen:
                name = f"{name}_{i}"
            seen.add(name)
            arr = check_array(name, np.asarray(_value_of(v)))
            inp = pt.tensor(name=name, dtype=arr.dtype, shape=(None, *arr.shape[1:]))
            arrays[name], replace[v], inputs[name] = arr, inp, inp
        for rv in model.free_RVs:
            shape = model.initial_point()[model.rvs_to_values[rv].name].shape
            if n_rows > 1 and n_rows in shape:
                raise ModelError(
                    f"free variable {rv.name!r} has a dimension of length {n_rows}, the number of "
                    "rows; distvi fits global parameters only (their number must not grow with "
                    "the rows)"
                )
        return cls(model, inputs, replace), arrays

    # ------------------------------------------------------------------ checks
    def _check_free_rvs(self, row_vars: set[Variable]) -> None:
        model = self.model
        for rv in model.free_RVs:
            if rv.dtype.startswith(("int", "uint", "bool")):
                raise ModelError(
                    f"free variable {rv.name!r} is discrete ({rv.dtype}); variational inference "
                    "here needs continuous free variables"
                )
            params = [i for i in rv.owner.inputs if not isinstance(i.type, pt.random.type.RandomType)]
            # a trailing dimension of the data (data["X"].shape[1]) is static: folding the
            # graph removes it, while the row count or data values stay
            if row_vars and any(_depends_on(p, row_vars) and _depends_on(
                    rewrite_graph(p, include=("fast_run",)), row_vars) for p in params):
                raise ModelError(
                    f"free variable {rv.name!r} has a size or parameters that depend on the data "
                    "rows; distvi fits global parameters only (their number must not grow with "
                    "the rows)"
                )

    # ------------------------------------------------------------------ graphs
    def _value_replacements(self, z: pt.TensorVariable) -> dict:
        return {
            vv: z[lay.start:lay.stop].reshape(lay.shape)
            for vv, lay in zip(self.model.value_vars, self.layout)
        }

    def rows_of(self, graph: pt.TensorVariable, points: pt.TensorVariable, n_points: int):
        """``graph`` of ``z`` evaluated at each row of ``points`` (S, D) -> (S, ...)."""
        return rows_of(graph, self.z, points, n_points)

    def data_term(self) -> DataTerm:
        """The data term as a picklable symbolic graph: what a worker compiles. It holds
        no data (a ready model's arrays were replaced by minibatch inputs)."""
        return DataTerm(self.z, self.data_logp, list(self.data_inputs.values()),
                        bool(self.model.check_bounds))

    def compile_data_term(self, n_points: int) -> Callable:
        """``f(points[S, D], *rows, scale) -> (scale * datalogp[S], scale * grad[S, D])``."""
        return self.data_term().compile(n_points)

    def compile_prior_term(self, n_points: int) -> Callable:
        """``f(points[S, D]) -> (varlogp[S], grad[S, D])``: the prior term at each point."""
        points = pt.matrix("points", dtype="float64", shape=(n_points, self.ndim))
        grad = pt.grad(self.prior_logp, self.z) if self.ndim else pt.zeros((0,))
        return function(
            [points], [self.rows_of(self.prior_logp, points, n_points),
                       self.rows_of(grad, points, n_points)],
            mode=self.compile_mode, trust_input=True, on_unused_input="ignore",
        )

    @property
    def compile_mode(self):
        return compile_mode(bool(self.model.check_bounds))

    # ------------------------------------------------------------------ points
    def initial_point(self) -> np.ndarray:
        """PyMC's initial point of the model, flat and unconstrained."""
        return self._initial.copy()

    def var(self, key: str) -> VarLayout:
        """The layout entry for a value-variable or random-variable name."""
        for lay in self.layout:
            if key in (lay.name, lay.rv_name):
                return lay
        raise KeyError(
            f"{key!r} is not a free variable of the model; known: "
            f"{[lay.rv_name for lay in self.layout]}"
        )

    def flat_from_start(self, start: Mapping[str, Any] | None) -> np.ndarray:
        """Initial point with ``start`` overrides (constrained values by RV name, or
        unconstrained values by value-variable name), flat and unconstrained."""
        flat = self.initial_point()
        if not start:
            return flat
        constrained = {}
        for key, value in start.items():
            lay = self.var(key)
            arr = np.asarray(value, dtype="float64")
            try:
                arr = np.broadcast_to(arr, lay.shape)
            except ValueError:
                raise ValueError(
                    f"start value for {key!r} has shape {arr.shape}, expected {lay.shape}"
                ) from None
            if key == lay.name or lay.transform is None:
                flat[lay.slice] = arr.ravel()
            else:
                constrained[lay.rv_name] = arr
        if constrained:
            flat = self.unconstrain(constrained, base=flat)
        if not np.all(np.isfinite(flat)):
            bad = [lay.rv_name for lay in self.layout if not np.all(np.isfinite(flat[lay.slice]))]
            raise ValueError(f"start values outside the support of {bad}")
        return flat

    def unconstrain(self, constrained: Mapping[str, np.ndarray], base: np.ndarray | None = None,
                    n_draws: int | None = None) -> np.ndarray:
        """Map constrained values (by RV name) to flat unconstrained vectors.

        With ``n_draws``, every array carries a leading draw axis and the result is (n_draws, D).
        """
        model = self.model
        rvs = {rv.name: rv for rv in model.free_RVs}
        holders = {rv: pt.tensor(dtype=rv.dtype, shape=(None,) * rv.ndim) for rv in model.free_RVs}
        outs, used = [], []
        for lay, rv in zip(self.layout, model.free_RVs):
            if lay.rv_name not in constrained:
                continue
            tr = model.rvs_to_transforms.get(rv)
            out = holders[rv] if tr is None else tr.forward(holders[rv], *rv.owner.inputs)
            outs.append(out)
            used.append(lay)
        outs = graph_replace(outs, dict(holders), strict=False)
        inputs = [holders[rvs[name]] for name in rvs]
        fn = function(inputs, outs, on_unused_input="ignore")

        def one(values: Mapping[str, np.ndarray]) -> np.ndarray:
            flat = (self.initial_point() if base is None else base).copy()
            full = {name: values.get(name) for name in rvs}
            for name, rv in rvs.items():
                if full[name] is None:  # not given: take the current (constrained) value
                    full[name] = self._constrained_of(flat, rv)
            res = fn(*[np.asarray(full[name], dtype=rvs[name].dtype) for name in rvs])
            for lay, r in zip(used, res):
                flat[lay.slice] = np.asarray(r, dtype="float64").ravel()
            return flat

        if n_draws is None:
            return one(constrained)
        return np.stack([one({k: v[i] for k, v in constrained.items()}) for i in range(n_draws)])

    def _constrained_of(self, flat: np.ndarray, rv) -> np.ndarray:
        fn = self.constrained_fn(include_transformed=False, deterministics=False)
        return fn(flat[None, :])[rv.name][0]

    # ------------------------------------------------------------------ results
    def constrained_fn(self, include_transformed: bool = False, deterministics: bool = True):
        """``f(points[S, D]) -> {name: (S, *shape)}``: free variables in the constrained
        space, deterministics that do not touch the data, and optionally the value variables."""
        key = (include_transformed, deterministics)
        cache = self.__dict__.setdefault("_constrained_cache", {})
        if key in cache:
            return cache[key]
        model = self.model
        row_vars = set(self._replace) | set(self.data_inputs.values())
        named = [(rv.name, rv) for rv in model.free_RVs]
        if deterministics:
            named += [
                (d.name, d) for d in model.deterministics if not (row_vars and _depends_on(d, row_vars))
            ]
        graphs = model.replace_rvs_by_values([g for _, g in named])
        if include_transformed:
            for lay, vv in zip(self.layout, model.value_vars):
                if lay.transform is not None:
                    named.append((lay.name, vv))
                    graphs.append(vv)
        graphs = graph_replace(graphs, self._value_replacements(self.z), strict=False)
        points = pt.matrix("points", dtype="float64")
        batched = vectorize_graph(graphs, {self.z: points})
        f = function([points], batched, on_unused_input="ignore")
        names = [n for n, _ in named]

        def fn(values: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, f(np.ascontiguousarray(values, dtype="float64"))))

        cache[key] = fn
        return fn

    def dims_and_coords(self, names) -> tuple[dict[str, list[str]], dict[str, Any]]:
        """ArviZ dims/coords for these variable names, from the model."""
        model = self.model
        dims = {n: list(model.named_vars_to_dims[n]) for n in names if n in model.named_vars_to_dims}
        used = {d for ds in dims.values() for d in ds}
        coords = {d: list(v) for d, v in model.coords.items() if d in used and v is not None}
        return dims, coords

    def free_rv_exprs(self, node, z: pt.TensorVariable):
        """``node`` (an expression of the model's variables) with the free variables set from
        a flat unconstrained vector ``z``."""
        model = self.model
        exprs = model.replace_rvs_by_values(node if isinstance(node, list) else [node])
        exprs = graph_replace(exprs, self._value_replacements(z), strict=False)
        return exprs if isinstance(node, list) else exprs[0]


def _rebuild_with_rows(graph: Variable, replace: dict[Variable, Variable]) -> Variable:
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


def _value_of(v: Variable) -> np.ndarray:
    if isinstance(v, SharedVariable):
        return v.get_value(borrow=True)
    if isinstance(v, Constant):
        return v.data
    raise ModelError(f"observed data {v} is neither a constant nor a pm.Data container")


def adapt(model: Any, data: Any) -> tuple[ModelAdapter, Any]:
    """The adapter and the data source for a factory, a ready model, or the model on the
    context stack (``model=None``), as ``pymc.fit`` finds it."""
    from distvi.data import ArraySource, as_source

    if model is None:
        try:
            model = pm.modelcontext(None)
        except TypeError:
            raise TypeError(
                "no model given: pass model= (a factory `model(data) -> pm.Model` or a "
                "pm.Model), or call inside `with pm.Model():`"
            ) from None
    if isinstance(model, pm.Model):
        if data is not None:
            raise TypeError(
                "data= goes with a model factory; a ready pm.Model already holds its data "
                "(its pm.Data containers and observed arrays are sharded)"
            )
        adapter, arrays = ModelAdapter.from_model(model)
        return adapter, ArraySource(arrays)
    if not callable(model):
        raise TypeError(f"model must be a pm.Model or a factory callable, got {type(model).__name__}")
    if data is None:
        raise TypeError(f"model factory {_factory_name(model)!r} needs data= (the arrays to shard)")
    source = as_source(data)
    schema = DataSchema(tuple((k, d, s) for k, (d, s) in source.schema().items()))
    return ModelAdapter.from_factory(model, schema), source
