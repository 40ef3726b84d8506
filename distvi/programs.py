"""A fit's compiled programs: its per-step program, and which fits run in fused blocks.

The per-step program (:func:`~distvi.driver.step.compile_program`) is kept by the
:class:`~distvi.inference.Inference`, keyed by what its graph depends on.

A fit runs in fused blocks (:mod:`distvi.driver.fused`) when its shards are in this
process (``backend="local"``), its operator's update is the loss's gradient (KL: ADVI,
FullRankADVI, KLqp) and ``backend_options={"fused": False}`` does not turn them off.

Compiled block programs are kept for the process (the last :data:`KEPT`): a fit whose
model graph, approximation, optimizer and shard shapes equal those of an earlier fit
(PyTensor's ``equal_computations`` on the model's log densities, constants compared by
value) reuses its program instead of compiling again. A new ``ADVI`` on the same model
and data therefore starts without a compile.
"""

from __future__ import annotations

import time

from pytensor.graph.basic import equal_computations

import numpy as np

from distvi.driver.fused import FusedStep, block_form, compile_block, max_steps, widest_row
from distvi.driver.step import Program, compile_program

KEPT = 16
_PROGRAMS: list[list] = []  # [key, graphs, inputs, program]


def dense(inference) -> tuple[int, ...]:
    """The parameters whose rate scale is a matrix (see ``compile_program``)."""
    return tuple(i for i, (c, p) in enumerate(zip(inference._scales or (), inference.state.params))
                 if np.ndim(c) > np.ndim(p))


def program_key(inference) -> tuple:
    """What the step's compiled graph depends on (an optimizer is a frozen name and
    hyperparameters; a schedule enters as an input, so it is not part of the key)."""
    opt = inference._optimizer
    hyper = tuple(sorted((k, v) for k, v in opt.hyper.items() if k != "learning_rate"))
    return (inference._draws_per_step(), inference._points_per_step(), opt.name, hyper,
            inference._max_norm, inference._cost_scale(), inference._scales is not None,
            dense(inference), getattr(inference.objective, "stl", None))


def step_program(inference) -> Program:
    """The per-step program of ``inference``'s current settings, compiled once per key."""
    key = program_key(inference)
    if key not in inference._programs:
        inference._programs[key] = compile_program(
            inference.approx, inference.objective, inference._optimizer, key[0], key[1],
            inference._max_norm, key[5], key[6], key[7])
    return inference._programs[key]


def _structure(inference, rows) -> tuple:
    """What the block's graph depends on besides the model's log densities."""
    approx, op = inference.approx, inference.objective
    groups = tuple((g.vfam, type(g.family).__name__, tuple(map(int, g.indices))) for g in approx.groups)
    shapes = tuple(tuple(map(int, getattr(v, "shape", ()))) for v in approx.params_values)
    return (type(op).__name__, getattr(op, "beta", None), groups, shapes,
            bool(approx.adapter.model.check_bounds), block_form(widest_row(rows)))


def _model_graphs(adapter) -> tuple[list, list]:
    return [adapter.data_logp, adapter.prior_logp], [adapter.z, *adapter.data_inputs.values()]


def _cached(key: tuple, adapter):
    graphs, inputs = _model_graphs(adapter)
    for entry in _PROGRAMS:
        k, old_graphs, old_inputs, _ = entry
        if k == key and len(inputs) == len(old_inputs) and equal_computations(
                graphs, old_graphs, inputs, old_inputs):
            return entry
    return None


def fused_step(inference, step, backend, watch=None) -> FusedStep | None:
    """The fused form of ``step`` for ``inference``'s started ``backend``, or None where
    the fit runs step by step."""
    shards = inference.shards
    if (shards.backend_name != "local" or not shards.options.get("fused", True) or shards.adapter.locals
            or not getattr(inference.objective, "fusable", False)):
        return None
    local = getattr(backend, "backend", backend)  # an anchored backend wraps the local one
    rows = local.fused_rows()
    anchor = None if watch is None else watch.anchor
    averaging = step.average_start is not None
    layout = tuple((s.batch, s.scale, tuple((str(r.dtype), r.shape[1:]) for r in s.rows))
                   for s in rows)
    n_draw = inference._draws_per_step()
    max_k = max_steps(n_draw, inference.approx.ndim, watch is not None)
    key = (program_key(inference), step.with_logp, averaging, watch is not None,
           anchor is not None, layout, max_k, _structure(inference, rows))
    adapter = inference.approx.adapter
    def build(form=None):
        return compile_block(
            inference.approx, inference.objective, inference._optimizer, adapter.data_term(),
            rows, n_draw, inference._points_per_step(), inference._max_norm,
            inference._cost_scale(), step.program.scaled, dense(inference), step.with_logp,
            averaging, watch is not None, anchor is not None, max_k, form)

    entry = _cached(key, adapter)
    compile_s = 0.0
    if entry is None:
        t0 = time.perf_counter()
        entry = [key, *_model_graphs(adapter), build()]
        compile_s = time.perf_counter() - t0
        _PROGRAMS.append(entry)
        del _PROGRAMS[:-KEPT]

    def fallback():  # the C form, kept in the entry: later fits do not try JAX again
        entry[3] = build("c")
        return entry[3]

    fused = FusedStep(step, entry[3], rows, anchor, fallback)
    fused.compile_s = compile_s
    return fused
