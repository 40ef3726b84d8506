"""Local variables: a free variable whose first axis is indexed by an integer data column
(one effect per user, store, county), fitted where its rows are.

``local={"a": "user"}`` makes ``a[g]`` a mean-field Gaussian factor of group ``g`` in the
unconstrained space, held by the shard worker that holds every row of group ``g``. The
driver's flat vector then holds the global variables only, and a worker's answer at a global
point is what the globals need: its groups' share of the ELBO at that point.

For a minibatch of rows ``i`` (each row with probability ``B_k/N_k``) of groups ``g(i)``,
with ``n_g`` rows in group ``g``, the worker's term at the global point ``z`` is

    scale * sum_i [ loglik_i(z, a_i) + (log p(a_i | z) + H_i) / n_{g(i)} ],
    a_i = mu_{g(i)} + softplus(rho_{g(i)}) * eps_i,

with ``scale = N_k/B_k``, ``H_i`` the entropy of group ``g(i)``'s factor and one normal
``eps_i`` per row and point. Every row carries ``1/n_g`` of its group's prior and entropy,
so the sum estimates ``sum_g (E_q log p(a_g | z) + H_g + sum_{i in g} E_q loglik_i)``
without bias, and only the groups a minibatch touches get a gradient.

The data term's graph must read the variable only as ``x[data[column]]``, where ``x`` is
the variable or an elementwise function of it and the globals (a non-centred
``mu + tau * a`` is fine): that indexing is replaced by a slot per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.basic import Constant, Variable
from pytensor.graph.replace import graph_replace, vectorize_graph
from pytensor.graph.traversal import ancestors, applys_between
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1

from distvi._compile import compile_mode, function
from distvi.model_errors import ModelError

LOG_2PI = float(np.log(2 * np.pi))
# the implicit column of a per-row local variable: each row its own group
ROW_COLUMN = "__row__"


@dataclass(frozen=True)
class LocalVar:
    """One local variable: its value variable's name, its RV's name, the data column that
    indexes its first axis, its unconstrained shape ``(groups, *rest)``, its transform."""

    name: str
    rv_name: str
    column: str
    shape: tuple[int, ...]
    transform: str | None

    @property
    def n_groups(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        """Unconstrained values per group."""
        return int(np.prod(self.shape[1:], dtype=int))


def check_local(local: Mapping[str, str] | None) -> dict[str, str]:
    """``local=`` as given: a mapping of variable names to column names (or None)."""
    if local is None:
        return {}
    if not isinstance(local, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in local.items()):
        raise TypeError("local= must map variable names to data column names, e.g. "
                        f"local={{'a': 'user'}}; got {local!r}")
    return dict(local)


def local_var(rv, vv, column: str, shape: tuple, transform: str | None, data_inputs: dict) -> LocalVar:
    """A local variable's entry, its column checked against the data."""
    if column not in data_inputs:
        raise ModelError(f"local={{{rv.name!r}: {column!r}}}: {column!r} is not a data column; "
                         f"the columns: {sorted(data_inputs)}")
    dtype = data_inputs[column].dtype
    if not dtype.startswith(("int", "uint")):
        raise ModelError(f"local={{{rv.name!r}: {column!r}}}: column {column!r} is {dtype}; the "
                         "column a local variable is indexed by must hold integer group "
                         "indices (0 .. groups - 1)")
    if not shape:
        raise ModelError(f"local variable {rv.name!r} is a scalar; a local variable has one "
                         f"entry per group on its first axis (e.g. dims={column!r})")
    return LocalVar(vv.name, rv.name, column, shape, transform)


def per_row_variables(model, row_vars: set, replace: dict, local: dict) -> list:
    """A factory's free variables whose first axis is the rows (``shape=data["y"].shape[0]``):
    local variables of their own, one group per row."""
    from distvi.pymc_models import depends_on, folded, row_sized_free_rvs

    if replace or not row_vars:  # a ready model's arrays have fixed sizes
        return []
    out = []
    for rv in row_sized_free_rvs(model, row_vars):
        if rv.ndim and depends_on(folded(rv.shape[0]), row_vars):
            if rv.name in local:
                raise ModelError(f"{rv.name!r} is sized by the rows: it is a local variable of "
                                 "its rows by itself; leave it out of local=")
            if any(s is None for s in rv.type.shape[1:]):
                raise ModelError(f"per-row variable {rv.name!r} needs fixed trailing dimensions, "
                                 f"got shape {rv.type.shape}")
            out.append(rv)
    return out


def initial_point(model, per_row: list, n_rows: int | None) -> dict:
    """PyMC's initial point (unconstrained), with zeros for the per-row variables (whose size
    the model only knows from the rows)."""
    if not per_row:
        return model.initial_point()
    from pymc.initial_point import make_initial_point_expression

    if n_rows is None:
        raise ModelError(f"per-row variables {[rv.name for rv in per_row]} need the data's rows")
    others = [rv for rv in model.free_RVs if rv not in per_row]
    exprs = make_initial_point_expression(
        free_rvs=others, rvs_to_transforms=model.rvs_to_transforms,
        initval_strategies=model.rvs_to_initial_values, return_transformed=True)
    values = function([], exprs)() if exprs else []
    point = {model.rvs_to_values[rv].name: np.asarray(v) for rv, v in zip(others, values)}
    for rv in per_row:
        point[model.rvs_to_values[rv].name] = np.zeros((int(n_rows), *rv.type.shape[1:]))
    return point


def _column_of(index: Variable, columns: dict) -> str | None:
    """The data column an index is (a cast of it allowed), or None."""
    while index.owner is not None and type(index.owner.op).__name__ == "Elemwise" \
            and type(index.owner.op.scalar_op).__name__ == "Cast":
        index = index.owner.inputs[0]
    return columns.get(index)


def _group_sized_constants(graph: Variable, n_groups: int, values=()) -> list:
    """Arrays of one entry per group in ``graph``: constants, and the value variables
    ``values`` of that leading size (a global with one entry per group)."""
    return [a for a in ancestors([graph]) if n_groups > 1 and (
        (isinstance(a, Constant) and a.ndim >= 1 and a.data.shape[0] == n_groups)
        or (a in values and a.ndim >= 1 and a.type.shape[0] == n_groups))]


def _at_rows(graph, vv, slots):
    """``graph`` with ``vv`` (a group per entry) replaced by ``slots`` (a row per entry), its
    nodes rebuilt so that their types follow; a shape check or a broadcast to the groups'
    size on the way is dropped (what it applies to has the rows' shape already)."""
    from pytensor.graph.traversal import io_toposort
    from pytensor.tensor.basic import Alloc
    from pytensor.tensor.shape import SpecifyShape

    new = {vv: slots}
    for node in io_toposort([vv], [graph]):
        inputs = [new.get(i, i) for i in node.inputs]
        if inputs == node.inputs:
            continue
        if isinstance(node.op, SpecifyShape | Alloc) and inputs[0] is not node.inputs[0]:
            new[node.outputs[0]] = inputs[0]
            continue
        for old, out in zip(node.outputs, node.op.make_node(*inputs).outputs):
            new[old] = out
    return new.get(graph, graph)


def _replace_indexing(data, vv, var: LocalVar, slots, columns: dict):
    """``data`` with every ``x[data[column]]`` (``x`` a function of ``vv``) replaced by
    ``x`` at the per-row ``slots``."""
    replace = {}
    for node in applys_between([vv], [data]):
        if not isinstance(node.op, AdvancedSubtensor1 | AdvancedSubtensor) or len(node.inputs) != 2:
            continue
        x, index = node.inputs
        if vv not in set(ancestors([x])):
            continue
        if _column_of(index, columns) != var.column:
            raise ModelError(
                f"local variable {var.rv_name!r} is indexed in the likelihood by something other "
                f"than data[{var.column!r}]; local={{{var.rv_name!r}: {var.column!r}}} needs "
                f"{var.rv_name}[data[{var.column!r}]]")
        at_rows = _at_rows(x, vv, slots)
        if _group_sized_constants(at_rows, var.n_groups):
            raise ModelError(
                f"local variable {var.rv_name!r} is combined with a per-group array before it "
                f"is indexed by data[{var.column!r}]; index that array by the column too")
        replace[node.outputs[0]] = at_rows
    if not replace:
        raise ModelError(f"local variable {var.rv_name!r} is not indexed by data[{var.column!r}] "
                         "in the likelihood; a local variable's first axis must be indexed by "
                         "the column it is local to")
    data = graph_replace(data, replace, strict=False)
    if vv in set(ancestors([data])):
        raise ModelError(
            f"local variable {var.rv_name!r} enters the likelihood other than as "
            f"{var.rv_name}[data[{var.column!r}]] (e.g. summed over its groups); only that "
            "indexing can be evaluated where the groups' rows are")
    return data


@dataclass
class LocalTerm:
    """The workers' term with local variables, as picklable graphs of one global point ``z``:
    ``outputs = [T, dT/dz, dT/dmu_j..., dT/drho_j...]`` (see the module's docstring) of the
    inputs ``eps_j, mu_j, rho_j`` (per-row slots, ``(B, width_j)``), ``weight`` (``1/n_g``
    per row), ``beta`` (the weight of the local priors and entropies, as KLqp's ``beta``
    weighs the globals') and the minibatch ``inputs``."""

    z: Variable
    outputs: list
    eps: list
    mu: list
    rho: list
    weight: Variable
    beta: Variable
    inputs: list
    check_bounds: bool
    locals: tuple[LocalVar, ...]
    initial: list  # each local variable's unconstrained initial values, (groups, width)

    def compile(self, n_points: int, with_logp: bool = True, with_grad: bool = True):
        """``f(points[S, D], *eps[S, B, w], *mu[B, w], *rho[B, w], weight[B], beta, *rows, scale) ->
        [scale * T[S], grad[S, D], *dmu[B, w], *drho[B, w]]``, the local gradients averaged
        over the points (the log density and gradient are always both computed)."""
        ndim = self.z.type.shape[0]
        points = pt.matrix("points", dtype="float64", shape=(n_points, ndim))
        scale = pt.scalar("scale", dtype="float64")
        eps_s = [pt.tensor3(f"eps{j}", dtype="float64") for j in range(len(self.eps))]
        if n_points == 1:
            outs = graph_replace(self.outputs, {self.z: points[0],
                                                **{e: s[0] for e, s in zip(self.eps, eps_s)}},
                                 strict=False)
            outs = [pt.shape_padleft(o) for o in outs]
        else:
            outs = vectorize_graph(self.outputs, {self.z: points, **dict(zip(self.eps, eps_s))})
        value, grad, *local = outs
        local = [scale * g.mean(axis=0) for g in local]
        return function([points, *eps_s, *self.mu, *self.rho, self.weight, self.beta, *self.inputs,
                         scale],
                        [scale * value, scale * grad, *local], mode=compile_mode(self.check_bounds),
                        trust_input=True, on_unused_input="ignore")


def build_local_term(model, local: dict[str, str], data_graph, to_z: dict, z, data_inputs: dict,
                     layout_of: dict, initial: dict, check_bounds: bool) -> LocalTerm:
    """The :class:`LocalTerm` of ``model`` with ``local``: ``data_graph`` is its data term in
    its value variables, ``to_z`` their replacement by the global flat vector ``z``."""
    from distvi.model_terms import without_pymc_checks

    columns = {v: k for k, v in data_inputs.items()}
    vvs = {rv.name: model.rvs_to_values[rv] for rv in model.free_RVs}
    eps, mus, rhos, locs, inits = [], [], [], [], []
    weight = pt.vector("weight", dtype="float64")
    beta = pt.scalar("beta", dtype="float64")  # KLqp's weight of the KL part (1: the ELBO)
    prior_rows, entropy = 0.0, 0.0
    for name in local:
        var = layout_of[name]
        rv = model[var.rv_name]
        vv = vvs[var.rv_name]
        e, m, r = (pt.matrix(f"{p}_{var.name}", dtype="float64") for p in ("eps", "mu", "rho"))
        sd = pt.softplus(r)
        slots = (m + sd * e).reshape((m.shape[0], *var.shape[1:]))
        if var.column == ROW_COLUMN:  # its entries are the rows': a slot per row as it is
            data_graph = _at_rows(data_graph, vv, slots)
        else:
            data_graph = _replace_indexing(data_graph, vv, var, slots, columns)
        elementwise = model.logp(vars=[rv], jacobian=True, sum=False)[0]
        at_rows = _at_rows(elementwise, vv, slots)
        if _group_sized_constants(at_rows, var.n_groups, set(to_z)):
            raise ModelError(
                f"the prior of local variable {var.rv_name!r} has parameters that differ by "
                "group; a local variable's prior must be the same for every group (given the "
                "globals)")
        prior_rows = prior_rows + (at_rows.reshape((m.shape[0], -1)).sum(axis=1)
                                   if var.shape[1:] else at_rows)
        entropy = entropy + pt.log(sd).sum(axis=1) + 0.5 * var.width * (1.0 + LOG_2PI)
        eps.append(e), mus.append(m), rhos.append(r), locs.append(var)
        inits.append(np.asarray(initial[var.name], dtype="float64").reshape(var.n_groups, var.width))
    term = pt.cast(data_graph, "float64") + beta * pt.sum(weight * (prior_rows + entropy))
    left = set(ancestors([term])) & {vvs[name] for name in local}
    if left:  # e.g. one local variable's prior read from another's groups
        raise ModelError(f"the terms of local variables {list(local)} read local variables "
                         f"{sorted(v.name for v in left)} other than at their rows (a local "
                         "variable's prior may depend on the globals only)")
    term = graph_replace(term, to_z, strict=False)
    grads = pt.grad(term, [z, *mus, *rhos], disconnected_inputs="ignore")
    outputs = without_pymc_checks([term, *grads], check_bounds)
    return LocalTerm(z, outputs, eps, mus, rhos, weight, beta, list(data_inputs.values()),
                     check_bounds, tuple(locs), inits)


# ---------------------------------------------------------------- results
def _draws_fn(adapter, key: str, graphs: list, locs: tuple):
    """``f(points[D, n], *u[D, *shape]) -> graphs`` at each draw (globals ``points``, local
    variables' unconstrained draws ``u``), compiled once per ``key``."""
    if key not in adapter.local_fns:
        model = adapter.model
        graphs = graph_replace(graphs, adapter.value_replacements(adapter.z), strict=False)
        points = pt.matrix("points", dtype="float64")
        held = [pt.tensor(f"u_{v.name}", dtype="float64", shape=(None, *v.shape)) for v in locs]
        vvs = [model.rvs_to_values[model[v.rv_name]] for v in locs]
        adapter.local_fns[key] = function(
            [points, *held], vectorize_graph(graphs, {adapter.z: points, **dict(zip(vvs, held))}),
            on_unused_input="ignore")
    return adapter.local_fns[key]


def local_values(adapter, draws: dict, flat: np.ndarray, include_transformed: bool) -> dict:
    """The local variables' draws ``draws`` (by entry: (D, *shape), unconstrained) by name:
    constrained (a transform's parameters from the globals' draws ``flat``), the
    deterministics of the groups, and with ``include_transformed`` the draws themselves."""
    model, locs = adapter.model, tuple(draws)
    per_group, _ = adapter.local_deterministics()
    graphs = [model.replace_rvs_by_values([model[v.rv_name]])[0] for v in locs]
    graphs += model.replace_rvs_by_values(per_group) if per_group else []
    fn = _draws_fn(adapter, "values:" + ",".join(v.name for v in locs), graphs, locs)
    outs = fn(np.ascontiguousarray(flat), *[np.ascontiguousarray(u) for u in draws.values()])
    names = [v.rv_name for v in locs] + [d.name for d in per_group]
    out = {n: np.asarray(o) for n, o in zip(names, outs)}
    if include_transformed:
        out.update({v.name: u for v, u in draws.items() if v.transform is not None})
    return out
