"""The model adapter: a PyMC model seen as a prior term plus a data term over one flat vector.

It turns either a factory ``model(data) -> pm.Model`` or a ready ``pm.Model`` into:

- the flat unconstrained layout (value variables in PyMC's order, with shapes and slices),
- the prior term ``varlogp(z)``: free variables, their Jacobians and the potentials that do
  not touch the data, counted once on the driver,
- the data term ``datalogp(z; rows)``: observed variables and data-touching potentials,
  summed over the rows it is given, evaluated by the shard workers.

Building the model is left to :mod:`distvi.model_factory` (a factory) and
:mod:`distvi.pymc_models` (a ready model); the terms it hands out are in
:mod:`distvi.model_terms`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import uuid
import warnings
from typing import Any

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace, vectorize_graph
from pytensor.graph.rewriting.utils import rewrite_graph

try:  # total_size's marker on observed variables
    from pymc.variational.minibatch_rv import MinibatchRandomVariable
except ImportError:  # pragma: no cover - other PyMC layouts
    MinibatchRandomVariable = ()

from distvi._compile import compile_mode, function
from distvi.model_errors import DiscreteVariableError, ModelError, ModelFactoryError
from distvi.local_terms import (ROW_COLUMN, LocalTerm, LocalVar, build_local_term, check_local,
                                initial_point, local_var, per_row_variables)
from distvi.model_factory import ModelFactory, factory_name, model_from_factory
from distvi.model_terms import (DataSchema, DataTerm, DeterministicTerm, VarLayout, rows_of,
                                without_pymc_checks)
from distvi.pymc_models import check_global_free_rvs, depends_on, find_row_data, rebuild_with_rows

__all__ = [
    "DataSchema", "DiscreteVariableError", "ModelAdapter", "ModelError", "ModelFactory",
    "ModelFactoryError", "VarLayout", "adapt",
]


class ModelAdapter:
    """A PyMC model as (layout, prior term, data term).

    Build with :meth:`from_factory` or :meth:`from_model`; both give the same object.
    """

    def __init__(
        self, model: pm.Model, data_inputs: dict[str, pt.TensorVariable], replace: dict,
        local: Mapping[str, str] | None = None, n_rows: int | None = None,
    ) -> None:
        self.model = model
        row_vars = set(replace) | set(data_inputs.values())
        for obs in model.observed_RVs:
            if isinstance(obs.owner.op, MinibatchRandomVariable):  # stripped by the builders
                raise ModelError(f"observed variable {obs.name!r} still carries total_size")
        local = check_local(local)
        per_row = per_row_variables(model, row_vars, replace, local)
        check_global_free_rvs(model, row_vars, tuple(per_row))
        if per_row:  # local variables of the rows: indexed by an implicit row column
            data_inputs = {**data_inputs, ROW_COLUMN: pt.vector(ROW_COLUMN, dtype="int64")}
            local.update({rv.name: ROW_COLUMN for rv in per_row})
        self.data_inputs = data_inputs
        point = initial_point(model, per_row, n_rows)
        layout, start, locals_ = [], 0, {}
        names = {n: rv.name for rv, vv in zip(model.free_RVs, model.value_vars) for n in (rv.name, vv.name)}
        if unknown := [n for n in local if n not in names]:
            raise ModelError(f"local={local!r}: {unknown} are not free variables of the model; "
                             f"its free variables: {[rv.name for rv in model.free_RVs]}")
        local = {names[n]: c for n, c in local.items()}
        self._pairs = []  # the global free variables and their value variables
        for rv, vv in zip(model.free_RVs, model.value_vars):
            shape = tuple(int(s) for s in np.shape(point[vv.name]))
            size = int(np.prod(shape, dtype=int))
            tr = model.rvs_to_transforms.get(rv)
            tr = None if tr is None else type(tr).__name__
            if rv.name in local:
                locals_[rv.name] = local_var(rv, vv, local[rv.name], shape, tr, self.data_inputs)
                continue
            layout.append(VarLayout(vv.name, rv.name, shape, start, start + size, tr))
            self._pairs.append((rv, vv))
            start += size
        self.layout: tuple[VarLayout, ...] = tuple(layout)
        self.locals: tuple[LocalVar, ...] = tuple(locals_.values())
        self.ndim = start
        self._initial = np.concatenate(
            [np.asarray(point[v.name], dtype="float64").ravel() for v in layout]
        ) if layout else np.zeros(0)
        self._local_initial = {v.name: point[v.name] for v in self.locals}

        data_potentials = [p for p in model.potentials if depends_on(p, row_vars)]
        prior_potentials = [p for p in model.potentials if p not in data_potentials]
        local_rvs = {model[v.rv_name] for v in self.locals}
        for p in prior_potentials:
            if local_rvs and depends_on(p, local_rvs):
                raise ModelError(f"potential {p.name!r} depends on local variables "
                                 f"{[v.rv_name for v in self.locals]} but not on the data; a "
                                 "local variable's terms must be row by row")
        self.z = pt.vector("z", dtype="float64", shape=(self.ndim,))
        to_z = self.value_replacements(self.z)
        prior = model.logp(vars=[*(rv for rv, _ in self._pairs), *prior_potentials], jacobian=True)
        data_terms = [*model.observed_RVs, *data_potentials]
        data = model.logp(vars=data_terms) if data_terms else pt.constant(0.0, dtype="float64")
        self.prior_logp = graph_replace(pt.cast(prior, "float64"), to_z, strict=False)
        data = rebuild_with_rows(pt.cast(data, "float64"), replace) if replace else data
        self._data_values = data  # in the value variables (what a local term is built from)
        self.data_logp = graph_replace(pt.cast(data, "float64"), to_z, strict=False)
        self._replace = replace
        self.local_fns: dict = {}  # local variables' results, compiled (see local_terms)
        # the total rows per step a ready model's pm.Minibatch asks for (None: not given)
        self.minibatch_size: int | None = None
        self.has_data = bool(data_inputs)
        if self.locals:  # the likelihood's use of them checked now, before any work
            self.data_term()

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_factory(cls, factory: ModelFactory, schema: DataSchema,
                     n_rows: int | None = None, local: Mapping[str, str] | None = None) -> ModelAdapter:
        """Call ``factory(data)`` with symbolic minibatch rows and adapt the model it returns.

        A key the factory reads that is not in the data, and (given the data's ``n_rows``)
        an array of the data's full rows in the model's data term where ``data[key]`` belongs,
        are :class:`ModelError` s naming them."""
        model, inputs = model_from_factory(factory, schema, n_rows)
        return cls(model, inputs, {}, local, n_rows)

    @classmethod
    def from_model(cls, model: pm.Model, local: Mapping[str, str] | None = None
                   ) -> tuple[ModelAdapter, dict[str, np.ndarray]]:
        """Adapt a ready model: its row-aligned data become symbolic inputs.

        ``pm.Minibatch`` views are replaced by their source arrays (the rows to shard; their
        ``batch_size`` becomes :attr:`minibatch_size`), and ``total_size`` is checked against
        the rows and dropped: the workers scale each minibatch by their own rows.

        Returns the adapter and the row-aligned arrays (name -> array) to shard (empty for a
        model without observed data: it is fitted on the driver alone).
        """
        rows = find_row_data(model)
        adapter = cls(rows.model, rows.inputs, rows.replace, local)
        adapter.minibatch_size = rows.batch_size
        return adapter, rows.arrays

    # ------------------------------------------------------------------ graphs
    def value_replacements(self, z: pt.TensorVariable) -> dict:
        """Each global value variable as its slice of the flat vector ``z``."""
        return {
            vv: z[lay.start:lay.stop].reshape(lay.shape)
            for (_, vv), lay in zip(self._pairs, self.layout)
        }

    def rows_of(self, graph: pt.TensorVariable, points: pt.TensorVariable, n_points: int):
        """``graph`` of ``z`` evaluated at each row of ``points`` (S, D) -> (S, ...)."""
        return rows_of(graph, self.z, points, n_points)

    def data_term(self) -> DataTerm | LocalTerm:
        """The data term as a picklable symbolic graph: what a worker compiles. It holds
        no data (a ready model's arrays were replaced by minibatch inputs)."""
        if "_data_term" not in self.__dict__ and self.locals:
            self._data_term = build_local_term(
                self.model, {v.rv_name: v.column for v in self.locals}, self._data_values,
                self.value_replacements(self.z), self.z, self.data_inputs,
                {v.rv_name: v for v in self.locals}, self._local_initial,
                bool(self.model.check_bounds))
        if "_data_term" not in self.__dict__:
            check_bounds = bool(self.model.check_bounds)
            # (a model without data has a constant data term: its gradient is zeros)
            graphs = [self.data_logp] + ([pt.grad(self.data_logp, self.z, disconnected_inputs="ignore")]
                                         if self.ndim else [])
            logp, *grad = without_pymc_checks(graphs, check_bounds)
            self._data_term = DataTerm(self.z, logp, list(self.data_inputs.values()), check_bounds,
                                       grad[0] if grad else None)
        return self._data_term

    def compile_data_term(self, n_points: int) -> Callable:
        """``f(points[S, D], *rows, scale) -> (scale * datalogp[S], scale * grad[S, D])``."""
        return self.data_term().compile(n_points)

    def compile_prior_term(self, n_points: int) -> Callable:
        """``f(points[S, D]) -> (varlogp[S], grad[S, D])``: the prior term at each point
        (compiled once per ``n_points``)."""
        cache = self.__dict__.setdefault("_prior_cache", {})
        if n_points not in cache:
            points = pt.matrix("points", dtype="float64", shape=(n_points, self.ndim))
            grad = pt.grad(self.prior_logp, self.z) if self.ndim else pt.zeros((0,))
            cache[n_points] = function(
                [points], [self.rows_of(self.prior_logp, points, n_points),
                           self.rows_of(grad, points, n_points)],
                mode=self.compile_mode, trust_input=True, on_unused_input="ignore",
            )
        return cache[n_points]

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
        rvs = {rv.name: rv for rv, _ in self._pairs}
        holders = {rv: pt.tensor(dtype=rv.dtype, shape=(None,) * rv.ndim) for rv in model.free_RVs}
        outs, used = [], []
        for lay, (rv, _) in zip(self.layout, self._pairs):
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
        named = [(rv.name, rv) for rv, _ in self._pairs]
        if deterministics:
            named += [
                (d.name, d) for d in model.deterministics
                if not (row_vars and depends_on(d, row_vars)) and not self._local_dependent(d)
            ]
        graphs = model.replace_rvs_by_values([g for _, g in named])
        if include_transformed:
            for lay, (_, vv) in zip(self.layout, self._pairs):
                if lay.transform is not None:
                    named.append((lay.name, vv))
                    graphs.append(vv)
        graphs = graph_replace(graphs, self.value_replacements(self.z), strict=False)
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
        dets = [d for d in model.deterministics if row_vars and depends_on(d, row_vars)
                and not self._local_dependent(d)]
        row_wise, names, others = [], [], []
        if dets:
            graphs = model.replace_rvs_by_values(dets)
            graphs = graph_replace(graphs, self.value_replacements(self.z), strict=False)
            inputs = set(self.data_inputs.values())
            for d, g in zip(dets, graphs):
                g = rebuild_with_rows(g, self._replace) if self._replace else g
                with warnings.catch_warnings():  # rewriting a bare shape graph: harmless notes
                    warnings.simplefilter("ignore")
                    lead = rewrite_graph(g.shape[0], include=("fast_run",)) if g.ndim else None
                if lead is not None and depends_on(lead, inputs):
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

    def local_spec(self) -> dict[str, str]:
        """``local=`` as given (per-row variables are local by themselves)."""
        return {v.rv_name: v.column for v in self.locals if v.column != ROW_COLUMN}

    def _local_dependent(self, node) -> bool:
        """Whether ``node`` depends on a local variable (its draws are the workers')."""
        return bool(self.locals) and depends_on(node, {self.model[v.rv_name] for v in self.locals})

    def local_deterministics(self) -> tuple[list, list[str]]:
        """The deterministics that depend on local variables: those of the groups (computed
        from the locals' draws), and the names of those that read the rows too (left out)."""
        row_vars = set(self._replace) | set(self.data_inputs.values())
        dets = [d for d in self.model.deterministics if self._local_dependent(d)]
        return ([d for d in dets if not depends_on(d, row_vars)],
                [d.name for d in dets if depends_on(d, row_vars)])

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
        exprs = graph_replace(exprs, self.value_replacements(z), strict=False)
        return exprs if isinstance(node, list) else exprs[0]


def adapt(model: Any, data: Any, local: Mapping[str, str] | None = None
          ) -> tuple[ModelAdapter, Any]:
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
        adapter, arrays = ModelAdapter.from_model(model, local)
        adapter.user_model = model
        return adapter, (ArraySource(arrays) if arrays else NoData())
    if not callable(model):
        raise TypeError(f"model must be a pm.Model or a factory callable, got {type(model).__name__}")
    if data is None:
        raise TypeError(f"model factory {factory_name(model)!r} needs data= (the arrays to shard)")
    source = as_source(data)
    schema = DataSchema(tuple((k, d, s) for k, (d, s) in source.schema().items()))
    return ModelAdapter.from_factory(model, schema, n_rows=source.n_rows, local=local), source
