"""A model's pieces over one flat unconstrained vector: where each value variable lives in
it, the schema of the row-aligned data, and the picklable data and deterministic terms the
shard workers compile. Nothing here reads a PyMC model; :mod:`distvi.model` builds these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.basic import Variable
from pytensor.graph.replace import graph_replace, vectorize_graph

from distvi._compile import Window, block_mode, compile_mode, function


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


def without_pymc_checks(graphs: list, check_bounds: bool) -> list:
    """``graphs`` with PyMC's parameter checks spelled in plain PyTensor, as PyMC's compile
    would rewrite them: an invalid parameter gives -inf (``check_bounds``) or no check at
    all. A shard worker then unpickles and compiles the data term without importing PyMC
    (about 2 s of CPU per worker). A check that must raise stays PyMC's. Rewrite a
    gradient's graph together with its log density's, after ``pt.grad`` (as PyMC's compile
    does: a check passes the gradient through; a switch built before ``pt.grad`` would not
    give the same graph)."""
    from pytensor.graph.traversal import ancestors

    def pymc_check(node) -> bool:
        op = node.op
        return (type(op).__name__ == "CheckParameterValue"
                and type(op).__module__.startswith("pymc.")
                and (not check_bounds or op.can_be_replaced_by_ninf))

    while True:
        node = next((v.owner for v in ancestors(graphs) if v.owner is not None and pymc_check(v.owner)),
                    None)
        if node is None:
            return graphs
        value, *conds = node.inputs
        if check_bounds:
            ok = conds[0] if len(conds) == 1 else pt.all([pt.all(c) for c in conds])
            plain = pt.switch(ok, value, -np.inf)
            if plain.dtype != node.outputs[0].dtype:
                plain = pt.cast(plain, node.outputs[0].dtype)
        else:
            plain = value
        graphs = graph_replace(graphs, {node.outputs[0]: plain}, strict=False)


@dataclass
class DataTerm:
    """The data term's graph: ``logp`` of the flat point ``z`` and the minibatch ``inputs``."""

    z: Variable
    logp: Variable
    inputs: list
    check_bounds: bool
    grad: Variable | None = None  # d logp / dz, when built with the log density (else built here)

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
        outputs = self.at(points, n_points, scale, with_logp=with_logp, with_grad=with_grad)
        return function(
            [points, *self.inputs, scale],
            outputs,
            mode=compile_mode(self.check_bounds),
            trust_input=True,
            on_unused_input="ignore",
        )


    def compile_window(self, n_points: int, with_logp: bool, batch: int, form: str) -> Callable:
        """``f(points[S, D], *rows, start, scale)``: :meth:`compile`'s outputs on the window
        ``rows[start:start + batch]`` of whole shuffled shards, compiled in ``form``
        (``"jax"``: the shard's rows stay on the device and the window is a dynamic slice)."""
        ndim = self.z.type.shape[0]
        points = pt.matrix("points", dtype="float64", shape=(n_points, ndim))
        scale = pt.scalar("scale", dtype="float64")
        start = pt.scalar("start", dtype="int64")
        rows = [inp.type(inp.name) for inp in self.inputs]
        window = [Window(batch)(r, start) for r in rows]
        outputs = self.at(points, n_points, scale, window, with_logp=with_logp)
        return function([points, *rows, start, scale], outputs,
                        mode=block_mode(form, compile_mode(self.check_bounds)),
                        trust_input=True, on_unused_input="ignore")

    def at(self, points, n_points: int, scale, rows: list | None = None, with_logp: bool = True,
           with_grad: bool = True) -> list:
        """Symbolically, what :meth:`compile` computes: ``[scale * datalogp[S]]`` and/or
        ``[scale * grad[S, D]]`` at ``points``, on ``rows`` (graphs standing for the row
        inputs, e.g. a window of a shard inside a fused block; default: the inputs)."""
        ndim = self.z.type.shape[0]
        graphs = []
        if with_logp:
            graphs.append(self.logp)
        if with_grad:
            if not ndim:
                graphs.append(pt.zeros((0,)))
            else:
                graphs.append(pt.grad(self.logp, self.z) if self.grad is None else self.grad)
        if rows is not None:
            graphs = graph_replace(graphs, dict(zip(self.inputs, rows)), strict=False)
        return [scale * rows_of(g, self.z, points, n_points) for g in graphs]


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

