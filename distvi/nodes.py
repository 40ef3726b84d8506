"""Symbolic draws from q on the approximation's shared parameters, as PyMC's API has them:
``symbolic_random``, ``logq`` and ``sample_node`` (every evaluation draws afresh)."""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt


class SymbolicNodes:
    """PyMC's symbolic API of an :class:`~distvi.approximations.Approximation` (a base class
    of it)."""

    def _shared_inputs(self) -> list:
        """The shared parameters with their current shapes fixed (the families need them)."""
        return [pt.specify_shape(v, np.shape(v.get_value(borrow=True))) for v in self.params]

    def symbolic_random(self, size: int | None = None, deterministic: bool = False,
                        random_seed: int | None = None):
        """Draws from q as a symbolic (size, D) matrix in the model's flat unconstrained order,
        on the shared parameters: every evaluation draws afresh (``deterministic``: the
        mean). ``size=None`` gives one draw, (1, D)."""
        import pytensor

        from pytensor.graph.basic import Variable

        self.require_bound()
        if isinstance(size, Variable):  # a symbolic size, as PyMC takes: given at evaluation
            n = pt.as_tensor(size).astype("int64")
        else:
            n = 1 if size is None else int(size)
            if n < 1:
                raise ValueError(f"size must be >= 1, got {size}")
        symbolic_det = isinstance(deterministic, Variable)
        # one generator, drawn from in draw_flat's order (group after group: its normals, then an
        # Empirical group's picks), so a first evaluation equals sample(random_seed=...)'s draws
        rng = pytensor.shared(np.random.default_rng(random_seed))
        state = rng
        sym = self.group_params(self._shared_inputs())
        parts = []
        for g, p in zip(self.groups, sym):
            if deterministic is True:
                eps = pt.zeros((n, g.ndim))
            else:
                state, eps = pt.random.normal(0.0, 1.0, size=(n, g.ndim), rng=state).owner.outputs
                if symbolic_det:
                    eps = pt.switch(pt.as_tensor(deterministic).astype("bool"), 0.0, eps)
            if g.vfam != "empirical":
                parts.append(g.family.draw(p, eps))
                continue
            at_mean = pt.repeat(g.family.mean(p)[None, :], n, axis=0)
            if deterministic is True:
                parts.append(at_mean)
                continue
            size_t = p["histogram"].shape[0]
            state, idx = pt.random.integers(0, size_t, size=(n,), rng=state).owner.outputs
            picked = g.family.draw(p, eps, idx)
            parts.append(pt.switch(pt.as_tensor(deterministic).astype("bool"), at_mean, picked)
                         if symbolic_det else picked)
        if state is not rng:
            rng.default_update = state
        z = parts[0] if len(parts) == 1 else pt.concatenate(parts, axis=1)
        return self.to_flat_order(z)

    def _logq_node(self, size: int | None, deterministic: bool = False,
                   random_seed: int | None = None):
        z = self.symbolic_random(size, deterministic, random_seed)
        logq = self.symbolic_logq(self._shared_inputs(), z)
        out = logq.mean() if size is None else logq
        out.tag.distvi_logq = True
        return out

    @property
    def logq(self):
        """log q at a fresh draw from q, symbolic (every evaluation draws anew); for ``size``
        draws at once: ``sample_node(approx.logq, size)``. Empirical groups have no density."""
        if any(g.vfam == "empirical" for g in self.groups):
            raise TypeError("an Empirical approximation has no density (logq)")
        return self._logq_node(None)

    def sample_node(self, node, size: int | None = None, deterministic: bool = False,
                    more_replacements: dict | None = None, random_seed: int | None = None):
        """``node`` (an expression of the model's variables) with the free variables drawn from
        q, symbolic, as PyMC's ``sample_node``: every evaluation draws afresh.

        Parameters
        ----------
        node
            A variable or list of variables of the model (or :attr:`logq`).
        size
            ``None``: one draw, shaped as ``node``; an int: that many, stacked on a new first
            axis.
        deterministic
            Use the mean of q instead of draws.
        more_replacements
            Further replacements applied to ``node`` first (e.g. data by other data).
        """
        ad = self.require_bound()
        if getattr(getattr(node, "tag", None), "distvi_logq", False):
            return self._logq_node(size, deterministic, random_seed)
        if more_replacements:
            from pytensor.graph.replace import graph_replace

            node = graph_replace(node, dict(more_replacements), strict=False)
        z = self.symbolic_random(size, deterministic, random_seed)
        zp = pt.vector("zp", dtype="float64", shape=(ad.ndim,))
        expr = ad.free_rv_exprs(node, zp)
        from pytensor.graph.replace import graph_replace, vectorize_graph

        if size is None:
            return graph_replace(expr, {zp: z[0]}, strict=False)
        return vectorize_graph(expr, {zp: z})
