"""What a shard worker does: log-likelihood and its gradient at given points, on its minibatch.

A worker knows nothing of the approximation. It holds one contiguous shard of the rows in
memory and answers ``evaluate(points[S, D], step) -> (datalogp[S], grad[S, D])``, scaled by
``N_k / B_k`` so that the sum over workers estimates the full-data term without bias.

Minibatches without a gather: at load the shard is shuffled once (a permutation drawn from
the worker's stream) and its first ``B_k`` rows are appended at the end; a step's minibatch
is the window of ``B_k`` rows starting at a uniform random offset in ``[0, N_k)``. Every row
is in a step's minibatch with probability ``B_k / N_k``, so the scaled estimate is unbiased,
and the window is a view: no rows are copied per step. The offset comes from a stream
addressed by (run seed, rank, step) only, so a retried step returns exactly what the lost
one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from distvi._rng import Stream

DataTerm = Callable[..., list[np.ndarray]]
OFFSET_BLOCK = 1024
FULL_CHUNK = 1 << 22  # row-point pairs per call of a full-data evaluation (32 MB per float64 array)


class ShardWorker:
    """One shard of rows and the compiled data term.

    Parameters
    ----------
    rows
        The shard's arrays, by name, in the order the data term takes them.
    rank
        The shard's index; it keys the minibatch stream.
    seed
        The run seed.
    batch_size
        Rows per minibatch; ``None``, or at least the shard's rows, uses the whole shard
        (an exact gradient).
    data_term
        ``data_term(n_points, with_logp)`` returns the compiled ``f(points, *rows, scale)``.
    """

    def __init__(
        self,
        rows: Mapping[str, np.ndarray],
        rank: int,
        seed: int,
        batch_size: int | None,
        data_term: Callable[[int], DataTerm],
    ) -> None:
        arrays = [np.asarray(a) for a in rows.values()]
        self.n_rows = int(arrays[0].shape[0])
        self.rank = rank
        self.full = batch_size is None or batch_size >= self.n_rows
        self.batch_size = self.n_rows if self.full else int(batch_size)
        self.scale = np.array(self.n_rows / self.batch_size, dtype="float64")
        self._stream = Stream(seed, rank + 1)
        self._data_term = data_term
        self._block, self._offsets = -1, []
        self._stein = None
        self._perm = None
        self._device: list | None = None  # the rows as JAX arrays, when the JAX form is used
        if self.full:
            self.rows = [np.ascontiguousarray(a) for a in arrays]
        else:
            # the shuffle is drawn once, before any step, from the worker's own key
            perm = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence(seed, spawn_key=(rank + 1, 0)))).permutation(self.n_rows)
            self._perm = perm  # row i of the shuffled shard is row perm[i] of the shard
            wrap = np.concatenate([perm, perm[: self.batch_size]])
            self.rows = [np.ascontiguousarray(np.take(a, wrap, axis=0)) for a in arrays]

    def warm(self, n_points: int, with_logp: bool = True) -> None:
        """Compile (and run once) the step's term for ``n_points`` points."""
        self.evaluate(np.zeros((n_points, self._data_term.data_term.z.type.shape[0])), 0, with_logp)

    def minibatch(self, step: int) -> list[np.ndarray]:
        """The rows of ``step``'s minibatch: a window of the shuffled shard (views, no copy)."""
        if self.full:
            return self.rows
        start = self._start(step)
        stop = start + self.batch_size
        return [a[start:stop] for a in self.rows]

    def _start(self, step: int) -> int:
        if self.full:
            return 0
        block, j = divmod(step, OFFSET_BLOCK)
        if block != self._block:
            # offsets for a block of steps in one draw; position-addressed, so identical to
            # drawing them one step at a time
            self._offsets = self._stream.integers(self.n_rows, OFFSET_BLOCK, block * OFFSET_BLOCK).tolist()
            self._block = block
        return self._offsets[j]

    def device_rows(self) -> list:
        """The shard's rows as JAX arrays (for the JAX form), moved there once. The worker
        then reads its rows through zero-copy views of them: the rows are held once."""
        if self._device is None:
            import jax

            self._device = [jax.device_put(a) for a in self.rows]
            self.rows = [np.asarray(d) for d in self._device]
        return self._device

    def offsets(self, step: int, k: int) -> np.ndarray:
        """The windows' starts of the ``k`` steps from ``step`` (what :meth:`minibatch` uses)."""
        return self._stream.integers(self.n_rows, k, step)

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Scaled minibatch log-likelihood and its gradient at each point (with
        ``with_logp=False`` the log-likelihood is not computed and comes back as zeros)."""
        n = points.shape[0]
        form = term_form(self.batch_size, n, points.shape[1])
        if form == "c" or not hasattr(self._data_term, "window"):
            out = self._data_term(n, with_logp)(points, *self.minibatch(step), self.scale)
        else:  # the shard's rows on the device once; the window sliced there
            fn = self._data_term.window(n, with_logp, self.batch_size, form)
            out = [np.asarray(o) for o in fn(points, *self.device_rows(), np.int64(self._start(step)),
                                             self.scale)]
        if with_logp:
            return out[0], out[1]
        return np.zeros(points.shape[0]), out[0]

    def full_logp(self, points: np.ndarray, chunk_elements: int = FULL_CHUNK) -> np.ndarray:
        """The log-likelihood of the whole shard (unscaled) at each point: every row once, in
        chunks of rows so that a chunk holds at most ``chunk_elements`` row-point pairs."""
        n_points = points.shape[0]
        fn = self._data_term(n_points, True, False)
        # the shuffled copy's first n_rows rows are every row once; a sum does not mind the order
        rows = self.rows if self.full else [a[:self.n_rows] for a in self.rows]
        per_chunk = max(1, chunk_elements // max(n_points, 1))
        total = np.zeros(n_points)
        one = np.array(1.0)
        for start in range(0, self.n_rows, per_chunk):
            total += fn(points, *[a[start:start + per_chunk] for a in rows], one)[0]
        return total

    def full_logp_grad(self, points: np.ndarray,
                       chunk_elements: int = FULL_CHUNK) -> tuple[np.ndarray, np.ndarray]:
        """The log-likelihood of the whole shard (unscaled) and its gradient at each point,
        in chunks of rows as :meth:`full_logp` does."""
        n_points = points.shape[0]
        fn = self._data_term(n_points, True, True)
        rows = self.rows if self.full else [a[:self.n_rows] for a in self.rows]
        per_chunk = max(1, chunk_elements // max(n_points, 1))
        logp, grad = np.zeros(n_points), np.zeros(points.shape)
        one = np.array(1.0)
        for start in range(0, self.n_rows, per_chunk):
            out = fn(points, *[a[start:start + per_chunk] for a in rows], one)
            logp += out[0]
            grad += out[1]
        return logp, grad

    def deterministics(self, term, points: np.ndarray) -> list[np.ndarray]:
        """The deterministics of ``term`` (a :class:`~distvi.model_terms.DeterministicTerm`) at each
        point over the whole shard, rows in the shard's own order: (S, N_k, ...) each."""
        cache = self.__dict__.setdefault("_det_fns", {})
        key = (term.key, points.shape[0])
        if key not in cache:
            cache[key] = term.compile(points.shape[0])
        rows = self.rows if self.full else [a[:self.n_rows] for a in self.rows]
        outs = cache[key](points, *rows)
        if self.full:
            return [np.asarray(o) for o in outs]
        ordered = []
        for o in outs:  # undo the load-time shuffle along the row axis
            back = np.empty_like(o)
            back[:, self._perm] = o
            ordered.append(back)
        return ordered

    # -------------------------------------------------------------- Stein kernel work by slices
    # Three calls per step, keyed by the driver's ``token``: the slice's squared distances are
    # kept between them (and recomputed if this worker restarted in between).
    def _distances(self, kernel, points: np.ndarray, lo: int, hi: int, token: int) -> np.ndarray:
        if self._stein is None or self._stein[0] != token:
            self._stein = (token, kernel.sq_dists(points, lo, hi))
        return self._stein[1]

    def stein_sample(self, kernel, points, lo: int, hi: int, token: int) -> np.ndarray:
        """A sample of the squared distances from rows ``lo:hi`` to every particle."""
        from distvi.stein import sample_stride

        H = self._distances(kernel, points, lo, hi, token)
        return H.ravel()[::sample_stride(H.size, points.shape[0])].copy()

    def stein_bracket(self, kernel, points, lo: int, hi: int, token: int, a: float, b: float):
        """How many of the slice's squared distances are below ``a``, and those in ``[a, b]``."""
        from distvi.stein import count_and_values

        return count_and_values(self._distances(kernel, points, lo, hi, token), a, b)

    def stein_rows(self, kernel, points, grads, h: float, temperature: float, lo: int, hi: int,
                   token: int) -> np.ndarray:
        """Rows ``lo:hi`` of the Stein direction (the driver fixed the bandwidth ``h``)."""
        H = self._distances(kernel, points, lo, hi, token)
        self._stein = None
        return kernel.phi_rows(points, grads, h, temperature, lo, hi, H=H)


# where a worker's data term runs in the JAX form (when jax imports): at many points (SVGD's
# particles, ASVGD's draws) with at least JAX_TERM_FROM row-point pairs, where XLA's vector
# elementwise kernels win (2,000 rows x 100 points: 2.9 ms against C's 13.4 ms); at one
# point the C form with the linked BLAS wins at every size measured (1k-100k rows x 20-100
# columns: JAX 1.0-3.9x slower), benchmarks/bench_terms.py
JAX_TERM_FROM = 20_000
JAX_TERM_POINTS = 16


def term_form(rows: int, n_points: int, ndim: int) -> str:
    """The compiled form of a worker's data term for ``rows`` rows a step at ``n_points``
    points: ``DISTVI_TERM_FORM`` (``c``, ``jax``), or by size (``auto``, the default)."""
    import os

    from distvi._compile import jax_imports

    form = os.environ.get("DISTVI_TERM_FORM", "auto").strip().lower()
    if form not in ("auto", "c", "jax"):
        raise ValueError(f"DISTVI_TERM_FORM must be 'auto', 'c' or 'jax', got {form!r}")
    if form == "auto":
        form = ("jax" if n_points >= JAX_TERM_POINTS and rows * n_points >= JAX_TERM_FROM
                and jax_imports() else "c")
    return form


class CompiledTerm:
    """The data term compiled once per variant, then reused: ``term(n_points, with_logp,
    with_grad)`` (C), and ``term.window(n_points, with_logp, batch, form)`` on whole
    shards and a window start (see :meth:`~distvi.model_terms.DataTerm.compile_window`)."""

    def __init__(self, data_term) -> None:
        self.data_term, self._cache = data_term, {}

    def __call__(self, n_points: int, with_logp: bool = True, with_grad: bool = True) -> DataTerm:
        key = (n_points, bool(with_logp), bool(with_grad))
        if key not in self._cache:
            self._cache[key] = self.data_term.compile(n_points, with_logp, with_grad)
        return self._cache[key]

    def window(self, n_points: int, with_logp: bool, batch: int, form: str) -> DataTerm:
        key = ("window", n_points, bool(with_logp), int(batch), form)
        if key not in self._cache:
            self._cache[key] = self.data_term.compile_window(n_points, with_logp, batch, form)
        return self._cache[key]


def compiled_by_points(data_term) -> CompiledTerm:
    """The data term's compiled variants (see :class:`CompiledTerm`)."""
    return CompiledTerm(data_term)
