"""Fused step blocks: ``k`` steps of the driver in one compiled program.

Where the shards live in the driver's process, a step needs Python only to call two
compiled functions (the data term, the update) and the hooks. A block instead runs ``k``
steps as one PyTensor ``scan`` whose body is the step itself: the points from this step's
normals, every shard's data term on its minibatch window (a dynamic slice of the shuffled
shard, at the offset the worker's own stream gives for that step), scaled ``N_k / B_k`` and
summed in rank order, then the same :func:`~distvi.driver.step.step_graph` as the per-step
program (prior, chain rule, clip, optimizer), and the running average. The block's normals,
offsets and learning rates are drawn beforehand from the same position-addressed streams,
so a block computes what ``k`` steps compute, and splitting a run into blocks of other sizes
changes no number (the body is one compiled function, whatever ``k``). Per-step loss,
gradient norm and finiteness (and, for a fit run until convergence, the iterates) come back
as arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace

from distvi._compile import Window, block_mode, function, jax_imports
from distvi.driver.state import DriverState
from distvi.driver.step import Step, not_finite_error, scale_inputs, step_graph
from distvi.errors import NotFiniteError
from distvi.optimizers import OptState

MAX_BLOCK = 4096          # steps a block runs at most
PADDINGS = (1, 32)        # a JAX block's inputs are padded to one of these, or to its max_k
BLOCK_SECONDS = 0.2       # a block's wall time at most (Ctrl-C stays prompt)
BLOCK_BYTES = 64 << 20    # the block's normals (and iterates) at most


FORMS = ("auto", "jax", "c", "numba")


# the widest row (values per row of any data array) at which ``auto`` picks the JAX form:
# logistic regression, batch 1k-100k, in us per step (C / JAX): 20 columns 93/67, 1509/1112,
# 7628/7018; 100 columns 153/180, 3128/4365, 16177/32243 (XLA's matrix-vector products on
# wide rows are slower than the linked OpenBLAS)
JAX_MAX_COLUMNS = 64


def block_form(columns: int = 0) -> str:
    """How blocks are compiled: ``DISTVI_BLOCK_FORM``. ``auto`` (the default): ``jax`` when
    the ``jax`` package imports and no data row is wider than :data:`JAX_MAX_COLUMNS`
    values (``columns``), else ``c``. ``jax``: the step by PyTensor's JAX backend,
    looped by XLA (64-bit: it turns on ``jax_enable_x64`` for the process). ``c``: a
    PyTensor ``scan`` in C with the linked BLAS. ``numba``: the same scan by Numba (for
    measurement: it compiles for tens of seconds and ran no faster)."""
    import os

    form = os.environ.get("DISTVI_BLOCK_FORM", "auto").strip().lower()
    if form not in FORMS:
        raise ValueError(f"DISTVI_BLOCK_FORM must be one of {list(FORMS)}, got {form!r}")
    if form == "auto":
        form = "jax" if columns <= JAX_MAX_COLUMNS and jax_imports() else "c"
    return form


def widest_row(shards: Sequence[ShardRows]) -> int:
    """Values per row of the widest data array of the shards."""
    return max((int(np.prod(np.shape(r)[1:])) for s in shards for r in s.rows), default=0)


class ShardRows(NamedTuple):
    """One in-process shard as a block reads it: its row arrays (shuffled and wrapped, as
    the worker holds them), rows a step (None: all), its scale ``N_k / B_k``, and
    ``offsets(step, k)``, the windows' starts of ``k`` steps from ``step``."""

    rows: Sequence[np.ndarray]
    batch: int | None
    scale: float
    offsets: Callable[[int, int], np.ndarray]
    device: Callable[[], list] | None = None  # the rows as JAX arrays, held once


class BlockInfo(NamedTuple):
    """What a block reports: per step, the loss, gradient norm and learning rate; the wall
    seconds of the block; the run's step before it; and the iterates (k, P) when asked."""

    losses: np.ndarray
    norms: np.ndarray
    rates: np.ndarray
    seconds: float
    step0: int
    iterates: np.ndarray | None = None

    @property
    def k(self) -> int:
        return len(self.losses)


def max_steps(n_draw: int, ndim: int, iterates: bool) -> int:
    """Steps a block runs at most: :data:`MAX_BLOCK`, fewer where its normals (and the
    iterates it returns) would pass :data:`BLOCK_BYTES`."""
    per_step = max(n_draw * ndim, 1) * 8 * (2 if iterates else 1)
    return max(1, min(MAX_BLOCK, BLOCK_BYTES // per_step))


class BlockProgram(NamedTuple):
    fn: Callable
    n_params: int
    averaging: bool
    iterates: bool
    anchored: bool


def compile_block(approx, operator, optimizer, data_term, shards: Sequence[ShardRows],
                  n_draw: int, n_points: int, max_norm: float | None, cost_scale: float,
                  scaled: bool, dense: tuple[int, ...], with_logp: bool, averaging: bool,
                  iterates: bool, anchored: bool, max_k: int = 0,
                  form: str | None = None) -> BlockProgram:
    """The block of the step :func:`~distvi.driver.step.compile_program` compiles with the
    same settings, over the in-process ``shards`` of ``data_term``."""
    adapter = approx.adapter
    D = adapter.ndim
    form = block_form(widest_row(shards)) if form is None else form
    shapes = [np.shape(v) for v in approx.params_values]
    P = len(shapes)
    params = [pt.tensor(f"p{i}", dtype="float64", shape=s) for i, s in enumerate(shapes)]
    state0 = [pt.tensor(f"s{i}", dtype=np.asarray(a).dtype, shape=np.shape(a))
              for i, a in enumerate(optimizer.init(shapes))]
    avg0 = [pt.tensor(f"a{i}", dtype="float64", shape=s) for i, s in enumerate(shapes)] if averaging else []
    n_avg0 = pt.scalar("n_avg", dtype="int64")
    lrs = pt.vector("lrs", dtype="float64")
    eps = pt.tensor3("eps", dtype="float64", shape=(None, n_draw, D))
    offsets = pt.matrix("offsets", dtype="int64", shape=(None, max(len(shards), 1)))
    flags = pt.vector("flags", dtype="bool")
    rows = [[inp.type(f"r{k}_{j}") for j, inp in enumerate(data_term.inputs)]
            for k in range(len(shards))]
    flat_rows = [r for shard in rows for r in shard]
    scales = scale_inputs(shapes, dense) if scaled else []
    anchor = [pt.vector("anchor", dtype="float64", shape=(D,)), pt.scalar("full_logp", dtype="float64"),
              pt.vector("full_grad", dtype="float64", shape=(D,))] if anchored else []
    n_state = len(state0)

    def body(lr, e, off, flag, *args):
        p, s = list(args[:P]), list(args[P:P + n_state])
        rest = args[P + n_state:]
        a, rest = list(rest[:len(avg0)]), rest[len(avg0):]
        n_avg, rest = (rest[0], rest[1:]) if averaging else (None, rest)
        r_flat, rest = rest[:len(flat_rows)], rest[len(flat_rows):]
        c, rest = list(rest[:len(scales)]), rest[len(scales):]
        g = step_graph(approx, operator, optimizer, p, s, lr, e, c, n_points, max_norm,
                       cost_scale, dense)
        points = approx.symbolic_points(p, e)
        if anchored:
            points = pt.concatenate([points, rest[0][None, :]], axis=0)
        n_eval = n_points + int(anchored)
        logp, grad, i = None, None, 0
        for k, shard in enumerate(shards):
            mine = list(r_flat[i:i + len(shard.rows)])
            i += len(shard.rows)
            if shard.batch is not None and form == "jax":
                mine = [Window(shard.batch)(r, off[k]) for r in mine]
            elif shard.batch is not None:
                mine = [r[off[k]:off[k] + shard.batch] for r in mine]
            outs = data_term.at(points, n_eval, pt.constant(np.float64(shard.scale)), mine,
                                with_logp=with_logp)
            lp, gr = (outs[0], outs[1]) if with_logp else (pt.zeros((n_eval,)), outs[0])
            logp = lp if logp is None else logp + lp
            grad = gr if grad is None else grad + gr
        if logp is None:  # no data: zeros, as the local backend answers without shards
            logp, grad = pt.zeros((n_eval,)), pt.zeros((n_eval, D))
        if anchored:
            logp = logp[:-1] - logp[-1] + rest[1]
            grad = grad[:-1] - grad[-1] + rest[2]
        outs = [*g.params, *g.state, g.loss, g.grad_norm, g.ok]
        outs = graph_replace(outs, dict(zip(g.inputs, [logp, grad])), strict=False)
        new_p, new_s = outs[:P], outs[P:P + n_state]
        loss, norm, ok = outs[P + n_state:]
        carry = [*new_p, *new_s]
        if averaging:
            n_new = n_avg + pt.cast(flag, "int64")
            first = pt.eq(n_new, 1)
            carry += [pt.switch(flag, pt.switch(first, q, v + (q - v) / n_new.astype("float64")), v)
                      for v, q in zip(a, new_p)]
            carry.append(n_new)
        per_step = [pt.cast(loss, "float64"), norm, ok]
        if iterates:
            per_step.append(pt.concatenate([pt.flatten(q) for q in new_p]) if P else pt.zeros((0,)))
        return carry + per_step

    n_carry = P + n_state + len(avg0) + int(averaging)
    init = [*params, *state0, *avg0, *([n_avg0] if averaging else [])]
    non_seq = [*flat_rows, *scales, *anchor]
    if form == "jax":
        one = [lrs.type.clone(shape=())("lr"), pt.matrix("e", dtype="float64", shape=(n_draw, D)),
               pt.vector("off", dtype="int64", shape=(offsets.type.shape[1],)),
               pt.scalar("flag", dtype="bool")]
        outs = body(*one, *init, *non_seq)
        fn = function([*init, *one, *non_seq], outs, mode=block_mode(form, adapter.compile_mode),
                      trust_input=True, on_unused_input="ignore")
        return BlockProgram(JaxBlock(fn, n_carry, len(init) + 4, max_k), P, averaging, iterates,
                            anchored)
    seq_out = pytensor.scan(
        body, sequences=[lrs, eps, offsets, flags],
        outputs_info=[*init, *([None] * (3 + int(iterates)))],
        non_sequences=non_seq, strict=False, return_list=True, return_updates=False)
    outputs = [o[-1] for o in seq_out[:n_carry]] + list(seq_out[n_carry:])
    fn = function([*init, lrs, eps, offsets, flags, *non_seq], outputs,
                  mode=block_mode(form, adapter.compile_mode), trust_input=True,
                  on_unused_input="ignore")
    return BlockProgram(fn, P, averaging, iterates, anchored)


class JaxBlock:
    """The JAX form of a block: the step compiled once by PyTensor's JAX backend, looped by
    ``jax.lax.fori_loop`` over a trip count given at run time, so that one XLA program
    serves every block size up to ``max_k`` (the block's normals, offsets, rates and flags
    are padded to it). Called as the C form's block function is, with the same outputs."""

    def __init__(self, step_fn, n_carry: int, n_seq_at: int, max_k: int) -> None:
        import jax
        import jax.numpy as jnp

        jit_fn = step_fn.vm.jit_fn
        self.step_fn = step_fn
        # the model's shared variables are the function's implicit inputs, after the others
        n_explicit = sum(1 for i in step_fn.maker.inputs if not i.implicit)
        self._shared = step_fn.input_storage[n_explicit:]
        self.n_carry, self.n_seq_at, self.max_k = n_carry, n_seq_at, max_k
        self._rows: tuple = ()
        self._rows_jax: tuple = ()
        self._pads: dict[int, list] = {}
        self.ran = False  # traced and compiled: an error now is the step's, not the form's

        def run(k, carry, seqs, rest):
            per0 = None

            def body(t, c):
                carry, per = c
                outs = jit_fn(*carry, *(x[t] for x in seqs), *rest)
                new = tuple(outs[:n_carry])
                vals = outs[n_carry:]
                per = tuple(b.at[t].set(v) for b, v in zip(per, vals))
                return new, per

            # the per-step outputs' buffers, shaped from one evaluation's abstract values
            shapes = jax.eval_shape(lambda: jit_fn(*carry, *(x[0] for x in seqs), *rest))
            size = seqs[0].shape[0]  # the padded length: one program per padding
            per0 = tuple(jnp.zeros((size, *o.shape), o.dtype) for o in shapes[n_carry:])
            return jax.lax.fori_loop(0, k, body, (tuple(carry), per0))

        self._run = jax.jit(run)

    def __call__(self, *args):
        import jax
        import numpy as onp

        a = self.n_seq_at - 4  # the carry, then the four sequences, then the rest
        carry, seqs, rest = args[:a], args[a:a + 4], args[a + 4:]
        k = len(seqs[0])
        # padded to the smallest of PADDINGS (and max_k) that holds k: a one-step block (a
        # callback at every step) moves one step's inputs, not max_k steps'
        size = next((p for p in PADDINGS if k <= p < self.max_k), self.max_k)
        if size not in self._pads:  # kept between blocks
            self._pads[size] = [onp.zeros((size, *onp.shape(x)[1:]), dtype=onp.asarray(x).dtype)
                                for x in seqs]
        padded = self._pads[size]
        for pad, x in zip(padded, seqs):
            pad[:k] = x
        rest = (*rest, *(c.storage[0] for c in self._shared))  # their values now
        if len(rest) != len(self._rows) or any(r is not q for r, q in zip(rest, self._rows)):
            # the shards' rows (JAX arrays already, from the workers) and the fixed inputs:
            # on the device once, not every block
            self._rows = tuple(rest)
            self._rows_jax = tuple(r if isinstance(r, jax.Array) else jax.device_put(r) for r in rest)
        carry_out, per = self._run(onp.int64(k), tuple(carry), tuple(padded), self._rows_jax)
        self.ran = True
        return [onp.asarray(c) for c in carry_out] + [onp.asarray(p)[:k] for p in per]


class FusedStep:
    """A :class:`~distvi.driver.step.Step` run in blocks of ``k`` steps by a
    :class:`BlockProgram` over in-process ``shards``; ``anchor`` as the anchored backend
    takes it (point, full-data log-likelihood, gradient), or None."""

    def __init__(self, step: Step, program: BlockProgram, shards: Sequence[ShardRows],
                 anchor: tuple | None = None, fallback: Callable | None = None) -> None:
        self.step, self.program, self.shards = step, program, list(shards)
        # the C form of the block, compiled by fallback() if the JAX form cannot trace
        self.fallback = fallback
        if isinstance(program.fn, JaxBlock) and all(s.device is not None for s in shards):
            self.rows = [r for s in shards for r in s.device()]
        else:
            self.rows = [np.asarray(r) for s in shards for r in s.rows]
        self.anchor = () if anchor is None else (
            np.asarray(anchor[0], dtype="float64"), np.asarray(float(anchor[1])),
            np.asarray(anchor[2], dtype="float64"))
        self.seconds = {"draw": 0.0, "block": 0.0}  # the driver's draws, the compiled block
        self.max_k = max_steps(step.program.n_draw, step.approx.ndim, program.iterates)
        self._step_s: float | None = None  # seconds a step takes, from the blocks so far
        self.compile_s = 0.0  # seconds its program took to compile, when this fit compiled it
        self._runs = 0

    def block_size(self) -> int:
        """Steps in the next block: as many as fit in :data:`BLOCK_SECONDS`."""
        if self._step_s is None:
            return min(self.max_k, 64)
        return max(1, min(self.max_k, int(BLOCK_SECONDS / max(self._step_s, 1e-7))))

    def rates(self, state: DriverState, k: int) -> np.ndarray:
        """The learning rates of ``k`` steps from ``state``; fewer when the schedule gives
        a rate that is not valid (the per-step path then raises at that step)."""
        step = self.step
        if step._constant_lr is not None:
            return np.full(k, float(step._constant_lr))
        out = []
        for i in range(k):
            try:
                out.append(float(step.learning_rate(state.opt_step + i)))
            except (ValueError, FloatingPointError):
                break
        return np.array(out, dtype="float64")

    def run(self, state: DriverState, k: int) -> tuple[DriverState, BlockInfo, np.ndarray]:
        """``k`` steps from ``state`` (fewer if the schedule's rates end): the new state,
        the block's report and its per-step finiteness."""
        t0 = time.perf_counter()
        step, prog = self.step, self.program
        lrs = self.rates(state, k)
        k = len(lrs)
        n_draw, D = step.program.n_draw, step.approx.ndim
        per = step.normals.per_step
        pos = state.draw_position
        eps = (step.normals.stream.normal((k, n_draw, D), pos) if per else np.zeros((k, n_draw, D)))
        offsets = np.zeros((k, max(len(self.shards), 1)), dtype="int64")
        for j, shard in enumerate(self.shards):
            if shard.batch is not None:
                offsets[:, j] = shard.offsets(state.step, k)
        steps = state.step + 1 + np.arange(k)
        start = step.average_start
        flags = (steps > start) if start is not None else np.zeros(k, dtype=bool)
        P = prog.n_params
        avg = (state.average if state.n_averaged else tuple(np.zeros_like(p) for p in state.params))
        init = [*state.params, *state.opt_state.flat]
        if prog.averaging:
            init += [*avg, np.asarray(state.n_averaged, dtype="int64")]
        t1 = time.perf_counter()
        try:
            out = prog.fn(*init, lrs, eps, offsets, flags, *self.rows, *step.scales, *self.anchor)
        except Exception as err:
            if not (isinstance(prog.fn, JaxBlock) and not prog.fn.ran and self.fallback):
                raise
            prog = self._fall_back(err)
            out = prog.fn(*init, lrs, eps, offsets, flags, *self.rows, *step.scales, *self.anchor)
        t2 = time.perf_counter()
        n_state = len(state.opt_state.flat)
        params = tuple(out[:P])
        opt = OptState(tuple(out[P:P + n_state]), state.opt_state.n_slots, P)
        i = P + n_state
        average, n_avg = state.average, state.n_averaged
        if prog.averaging:
            n_avg = int(out[i + P])
            average = tuple(np.array(a) for a in out[i:i + P]) if n_avg else ()
            i += P + 1
        losses, norms, oks = out[i], out[i + 1], out[i + 2]
        iterates = out[i + 3] if prog.iterates else None
        new = DriverState(params, opt, state.step + k, state.opt_step + k, pos + k * per,
                          average, n_avg)
        self.seconds["draw"] += t1 - t0
        self.seconds["block"] += t2 - t1
        seconds = t2 - t0
        if k and self._runs:  # the first call compiles (JAX) or warms up: not a step's time
            self._step_s = seconds / k
        self._runs += 1
        if not step.with_logp:
            losses = np.full(k, np.nan)
        return new, BlockInfo(np.asarray(losses), np.asarray(norms), lrs, seconds, state.step,
                              iterates), np.asarray(oks, dtype=bool)

    def _fall_back(self, err: Exception) -> BlockProgram:
        import warnings

        from distvi.errors import FormWarning

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"the fused block's JAX form could not compile this model ({type(err).__name__}: "
                      f"{first[:200]}); running its C form instead (same numbers, slower). "
                      "DISTVI_BLOCK_FORM=c skips the attempt", FormWarning, stacklevel=2)
        self.program, self.fallback = self.fallback(), None
        self.rows = [np.asarray(r) for s in self.shards for r in s.rows]
        return self.program

    def fail(self, state: DriverState, backend) -> None:
        """Raise the error of the step from ``state``, the first of a block that could not
        run: the schedule's invalid rate, or :class:`~distvi.errors.NotFiniteError` naming
        its variables (``state`` unchanged)."""
        new, _, ok = self.run(state, 1)
        if len(ok) == 0:  # the schedule's rate at this step is not valid: the step says why
            self.step.learning_rate(state.opt_step)
        raise self.not_finite(state, backend, new.params)

    def not_finite(self, state: DriverState, backend, params) -> NotFiniteError:
        """The error for the step from ``state``: the per-step path names its variables."""
        step = self.step
        points = step.draw(state)
        answers = backend.evaluate(points, state.step, step.with_logp)
        return not_finite_error(step.approx, state.step, points, answers[1], params)


def first_bad(ok: np.ndarray) -> int | None:
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def block_hooks(hooks: Sequence[Any]) -> bool:
    """Whether every hook can see a block at once (it has ``horizon`` and ``block``)."""
    return all(hasattr(h, "horizon") and hasattr(h, "block") for h in hooks)
