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
import uuid
import warnings
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

try:  # PyMC's minibatch pieces (pm.Minibatch and total_size)
    from pymc.data import MinibatchOp
    from pymc.variational.minibatch_rv import MinibatchRandomVariable
except ImportError:  # pragma: no cover - other PyMC layouts
    MinibatchOp = MinibatchRandomVariable = ()

from distvi._compile import compile_mode, function
from distvi.data import check_array

ModelFactory = Callable[[Mapping[str, Any]], pm.Model]


class ModelError(ValueError):
    """The model cannot be fitted by distvi as written."""


try:
    from pymc.variational.opvi import ParametrizationError as _PyMCParametrizationError
except ImportError:  # pragma: no cover
    _PyMCParametrizationError = ValueError


class DiscreteVariableError(ModelError, _PyMCParametrizationError):
    """A discrete free variable: also PyMC's ``ParametrizationError``, which PyMC raises for it."""


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


@dataclass
class DeterministicTerm:
    """Deterministics that depend on the data rows, as a picklable graph of the flat point
    ``z`` and the row ``inputs``: what a shard worker evaluates on its whole shard for the
    draws of ``approx.sample()``. Every output has the rows on its first axis."""

    z: Variable
    outputs: list
    inputs: list
    names: tuple[str, ...]
    key: str

    def compile(self, n_points: int) -> Callable:
        """``f(points[S, D], *rows) -> [(S, n_rows, ...) per deterministic]``."""
        points = pt.matrix("points", dtype="float64", shape=(n_points, self.z.type.shape[0]))
        outs = [vectorize_graph(o, {self.z: points}) for o in self.outputs]
        return function([points, *self.inputs], outs, on_unused_input="ignore")


def _factory_name(factory: Callable) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


def _depends_on(var: Variable, targets: set[Variable]) -> bool:
    return any(a in targets for a in ancestors([var]))


class _MissingDataKey(KeyError):
    """A model factory read a key the data does not have (``from_factory`` names it)."""


class _FactoryData(dict):
    """The mapping a model factory is given: the symbolic minibatch rows by name. A key that
    is not there raises a KeyError subclass (a factory may catch KeyError for optional keys);
    uncaught, :meth:`ModelAdapter.from_factory` turns it into a :class:`ModelError`."""

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
    terms = [*model.observed_RVs, *(p for p in model.potentials if _depends_on(p, row_vars))]
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
            value = _value_of(inp)
            if np.ndim(value) >= 1 and np.shape(value)[0] == n_rows \
                    and core(np.shape(value)) not in column_shapes:
                found[inp] = tuple(np.shape(value))
    for v in values:  # an observed full array is the value itself
        if v not in found and isinstance(v, Constant | SharedVariable):
            value = _value_of(v)
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
    return (f"model factory {_factory_name(factory)!r}: " + "; ".join(dict.fromkeys(parts)) +
            f": distvi calls the factory with each step's minibatch rows, not the {n_rows} rows "
            "of the data")


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
            if isinstance(obs.owner.op, MinibatchRandomVariable):  # stripped by the builders
                raise ModelError(f"observed variable {obs.name!r} still carries total_size")
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
        # the total rows per step a ready model's pm.Minibatch asks for (None: not given)
        self.minibatch_size: int | None = None
        self.has_data = bool(data_inputs)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_factory(cls, factory: ModelFactory, schema: DataSchema,
                     n_rows: int | None = None) -> ModelAdapter:
        """Call ``factory(data)`` with symbolic minibatch rows and adapt the model it returns.

        A key the factory reads that is not in the data, and (given the data's ``n_rows``)
        an array of the data's full rows in the model's data term where ``data[key]`` belongs,
        are :class:`ModelError` s naming them."""
        inputs = schema.inputs()
        try:
            model = factory(_FactoryData(inputs))
        except _MissingDataKey as err:
            raise ModelError(
                f"model factory {_factory_name(factory)!r} reads data[{err.args[0]!r}], which is "
                f"not in the data; the data has keys {list(inputs)}"
            ) from None
        except Exception as err:  # the user's code: say whose it was
            raise ModelFactoryError(
                f"model factory {_factory_name(factory)!r} raised {type(err).__name__}: {err}"
            ) from err
        if not isinstance(model, pm.Model):
            raise TypeError(
                f"model factory {_factory_name(factory)!r} must return a pymc.Model, "
                f"got {type(model).__name__}"
            )
        if n_rows is not None:
            trailing = {name: t for name, _, t in schema.columns}
            full = _full_row_arrays(model, inputs, trailing, int(n_rows))
            if full:
                raise ModelError(_full_rows_message(factory, full, trailing, int(n_rows)))
        _check_discrete(model)
        # total_size: checked against the rows, and dropped
        model, _ = _plain_model(model, n_rows, list(inputs.values()))
        return cls(model, inputs, {})

    @classmethod
    def from_model(cls, model: pm.Model) -> tuple[ModelAdapter, dict[str, np.ndarray]]:
        """Adapt a ready model: its row-aligned data become symbolic inputs.

        ``pm.Minibatch`` views are replaced by their source arrays (the rows to shard; their
        ``batch_size`` becomes :attr:`minibatch_size`), and ``total_size`` is checked against
        the rows and dropped: the workers scale each minibatch by their own rows.

        Returns the adapter and the row-aligned arrays (name -> array) to shard (empty for a
        model without observed data: it is fitted on the driver alone).
        """
        _check_discrete(model)
        if not model.observed_RVs:
            return cls(model, {}, {}), {}
        values = [model.rvs_to_values[o] for o in model.observed_RVs]
        minibatches = _minibatch_nodes([*values, *model.deterministics, *model.potentials])
        lengths = {}
        for v in values:
            arr = _value_of(_source_of(v))
            if arr.ndim >= 1:
                lengths[_name_of(model, v)] = int(arr.shape[0])
        for node in minibatches:
            for i in node.inputs[:-1]:
                lengths.setdefault(_name_of(model, i), int(_value_of(i).shape[0]))
        if len(set(lengths.values())) > 1:
            raise ModelError(
                "observed data (and pm.Minibatch arrays) must share one leading (row) dimension; "
                f"got {lengths}"
            )
        if not lengths:
            raise ModelError("the observed data are scalars: there are no rows to shard")
        n_rows = next(iter(lengths.values()))
        batch = _minibatch_size(minibatches)
        model, views = _plain_model(model, n_rows)
        values = [model.rvs_to_values[o] for o in model.observed_RVs]
        graph = model.logp(vars=model.observed_RVs)
        # (graph variable, the array it stands for): full-row constants and pm.Data, and the
        # stand-ins of pm.Minibatch views
        found = []
        for v in ancestors([graph, *values, *model.deterministics]):
            if v in views:
                found.append((v, views[v]))
            elif isinstance(v, Constant | SharedVariable) and getattr(v, "ndim", 0) >= 1 \
                    and _value_of(v).shape[0] == n_rows:
                found.append((v, v))
        names = {v: k for k, v in model.named_vars.items()}
        for o in model.observed_RVs:
            names.setdefault(model.rvs_to_values[o], o.name)
        arrays, replace, inputs, by_array = {}, {}, {}, {}
        for i, (var, src) in enumerate(dict.fromkeys(found)):
            value = _value_of(src)
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
        adapter = cls(model, inputs, replace)
        adapter.minibatch_size = batch
        return adapter, arrays

    # ------------------------------------------------------------------ checks
    def _check_free_rvs(self, row_vars: set[Variable]) -> None:
        model = self.model
        _check_discrete(model)
        for rv in model.free_RVs:
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

    def data_deterministics(self) -> tuple[DeterministicTerm | None, list[str]]:
        """The deterministics that depend on the data: those with the rows on their first axis
        as a :class:`DeterministicTerm` the shard workers evaluate (None when there are
        none), and the names of the others (a data-dependent value that is not row by row,
        such as a sum over the rows, has no per-shard answer)."""
        cached = self.__dict__.get("_data_dets")
        if cached is not None:
            return cached
        model = self.model
        row_vars = set(self._replace) | set(self.data_inputs.values())
        dets = [d for d in model.deterministics if row_vars and _depends_on(d, row_vars)]
        row_wise, names, others = [], [], []
        if dets:
            graphs = model.replace_rvs_by_values(dets)
            graphs = graph_replace(graphs, self._value_replacements(self.z), strict=False)
            inputs = set(self.data_inputs.values())
            for d, g in zip(dets, graphs):
                g = _rebuild_with_rows(g, self._replace) if self._replace else g
                with warnings.catch_warnings():  # rewriting a bare shape graph: harmless notes
                    warnings.simplefilter("ignore")
                    lead = rewrite_graph(g.shape[0], include=("fast_run",)) if g.ndim else None
                if lead is not None and _depends_on(lead, inputs):
                    row_wise.append(pt.cast(g, "float64") if g.dtype.startswith("float") else g)
                    names.append(d.name)
                else:
                    others.append(d.name)
        term = None
        if row_wise:
            term = DeterministicTerm(self.z, row_wise, list(self.data_inputs.values()),
                                     tuple(names), uuid.uuid4().hex)
        self._data_dets = (term, others)
        return self._data_dets

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
        nodes = node if isinstance(node, list) else [node]
        user = getattr(self, "user_model", None)
        if user is not None and user is not model:  # the model was rebuilt without minibatches
            nodes = graph_replace(nodes, {rv: model[rv.name] for rv in user.free_RVs},
                                  strict=False)
        exprs = model.replace_rvs_by_values(nodes)
        exprs = graph_replace(exprs, self._value_replacements(z), strict=False)
        return exprs if isinstance(node, list) else exprs[0]


def _check_discrete(model: pm.Model) -> None:
    """Discrete free variables are refused first, before any check of the data."""
    for rv in model.free_RVs:
        if rv.dtype.startswith(("int", "uint", "bool")):
            raise DiscreteVariableError(
                f"free variable {rv.name!r} is discrete ({rv.dtype}); distvi's variational "
                "inference needs continuous free variables: marginalise it out of the model "
                "(e.g. a mixture likelihood over its values), or sample the model with PyMC's "
                "samplers (pm.sample)"
            )


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


def _plain_model(model: pm.Model, n_rows: int | None, inputs=()) -> tuple[pm.Model, dict]:
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
    from distvi.data import ArraySource, NoData, as_source

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
        adapter.user_model = model
        return adapter, (ArraySource(arrays) if arrays else NoData())
    if not callable(model):
        raise TypeError(f"model must be a pm.Model or a factory callable, got {type(model).__name__}")
    if data is None:
        raise TypeError(f"model factory {_factory_name(model)!r} needs data= (the arrays to shard)")
    source = as_source(data)
    schema = DataSchema(tuple((k, d, s) for k, (d, s) in source.schema().items()))
    return ModelAdapter.from_factory(model, schema, n_rows=source.n_rows), source
