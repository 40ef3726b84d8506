"""Results of an approximation: draws from q in the constrained space (InferenceData or
PyMC's ``MultiTrace``) with the model's deterministics, and moments by variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from distvi._validate import is_int

if TYPE_CHECKING:  # imported where used: a shard worker that imports distvi needs none of it
    import xarray as xr

# draws of data-dependent deterministics that approx.sample() computes on the workers, at most
DETERMINISTICS_MAX_MB = 512
# draws of local variables approx.sample() gathers on the driver, at most
LOCAL_DRAWS_MAX_MB = 1024
LOCAL_DRAW_STREAM = 2**33  # + rank: draws of a shard's local variables for results


class LocalDrawsTooLarge(ValueError):
    """The draws of the local variables asked for are over :data:`LOCAL_DRAWS_MAX_MB`."""


def draw_local(state: dict, draws: int, seed: int, rank: int,
               first: int = 0, stop: int | None = None) -> list[np.ndarray]:
    """Draws ``first .. stop - 1`` of ``draws`` (default: all) of each local variable of a
    shard's ``state`` (its groups in their own order), unconstrained, ``(n, groups, width)``
    each, from the stream addressed by (``seed``, ``rank``): a worker and the driver holding
    the same state draw the same, in one piece or in blocks of draws."""
    from distvi._rng import Stream
    from distvi.families import softplus

    stop = draws if stop is None else stop
    stream, at, out = Stream(seed, LOCAL_DRAW_STREAM + rank), 0, []
    for mu, rho in zip(state["mu"], state["rho"]):
        eps = stream.normal((stop - first, *mu.shape), at + first * mu.size)
        at += draws * mu.size
        out.append(mu + softplus(rho) * eps)
    return out


def join_shards(parts: list[list[np.ndarray]], axis: int = 0) -> list[np.ndarray]:
    """Each local variable's arrays from every shard (``parts[rank][variable]``, in rank
    order) joined along the groups' ``axis``: the shards hold consecutive groups."""
    return [np.concatenate(arrays, axis=axis) for arrays in zip(*parts)]


class Results:
    """What an :class:`~distvi.approximations.Approximation` gives as results (a base class
    of it): :meth:`sample`, and the moments by variable."""

    def _by_var(self, flat: np.ndarray, local: dict | None = None) -> xr.Dataset:
        import xarray as xr

        ad = self.require_bound()
        names = [lay.name for lay in (*ad.layout, *ad.locals)] + [lay.rv_name for lay in (*ad.layout, *ad.locals)]
        dims, coords = ad.dims_and_coords(names)
        out = {}
        for lay in ad.layout:
            d = dims.get(lay.name) or (dims.get(lay.rv_name) if lay.transform is None else None)
            if not d or len(d) != len(lay.shape):
                d = [f"{lay.name}_dim_{i}" for i in range(len(lay.shape))]
            out[lay.name] = xr.DataArray(flat[lay.slice].reshape(lay.shape), dims=d)
        for var, value in (local or {}).items():
            d = dims.get(var.name) or (dims.get(var.rv_name) if var.transform is None else None)
            if not d or len(d) != len(var.shape):
                d = [f"{var.name}_dim_{i}" for i in range(len(var.shape))]
            out[var.name] = xr.DataArray(value.reshape(var.shape), dims=d)
        return xr.Dataset(out, coords={k: v for k, v in coords.items()
                                       if any(k in a.dims for a in out.values())})

    @property
    def mean_data(self) -> xr.Dataset:
        """Mean of q by value-variable name (local variables' too)."""
        return self._by_var(np.asarray(self.mean), {v: p[0] for v, p in self._locals().items()})

    @property
    def std_data(self) -> xr.Dataset:
        """Standard deviation of q by value-variable name (local variables' too)."""
        from distvi.families import softplus

        return self._by_var(np.asarray(self.std),
                            {v: softplus(p[1]) for v, p in self._locals().items()})

    def _locals(self) -> dict:
        """Each local variable's ``(mu, rho)``, ``(groups, width)`` each, by its entry: what
        the fit's workers hold (or held when they were let go; before any fit, the initial
        values)."""
        ad = self.require_bound()
        if not ad.locals:
            return {}
        states = self._pickled_local_states()
        if states is None:
            params = self.shard_data.local_params()
            return {v: params[v.name] for v in ad.locals}
        mus, rhos = join_shards([s["mu"] for s in states]), join_shards([s["rho"] for s in states])
        return {v: (mu, rho) for v, mu, rho in zip(ad.locals, mus, rhos)}

    def _pickled_local_states(self):
        """An unpickled approximation's local state (None while it has its fit's shards)."""
        if self.shard_data is not None:
            return None
        states = self.__dict__.get("local_states")
        if states is None:
            raise ValueError("this approximation was pickled before its local variables were "
                             "fitted: it holds no parameters of theirs")
        return states

    def _local_draws(self, draws: int, rng: np.random.Generator, flat: np.ndarray,
                     include_transformed: bool) -> dict[str, np.ndarray]:
        """Draws of the local variables from their groups' factors (drawn where the groups'
        parameters are: by the workers, see :meth:`Shards.local_draws`), constrained with
        the globals' draws ``flat`` where a transform reads them."""
        ad = self.require_bound()
        if not ad.locals:
            return {}
        size = sum(draws * v.n_groups * v.width for v in ad.locals) * 8 / 2**20
        if size > LOCAL_DRAWS_MAX_MB:
            raise LocalDrawsTooLarge(
                f"{draws} draws of local variables {[v.rv_name for v in ad.locals]} take "
                f"{size:.0f} MB (limit distvi.results.LOCAL_DRAWS_MAX_MB = {LOCAL_DRAWS_MAX_MB}); "
                "take fewer draws, raise the limit, or leave them out (include_locals=False); "
                "their means and sds are in mean_data and std_data"
                + (f"; the run store {self.local_draws_store!r} holds draws of them the workers "
                   "wrote (distvi.open_run(store).local_draws(name))"
                   if getattr(self, "local_draws_store", None) else ""))
        seed = int(rng.integers(2**62))
        states = self._pickled_local_states()
        if states is None:
            arrays = self.shard_data.local_draws(draws, seed)
        else:
            arrays = join_shards([draw_local(s, draws, seed, k) for k, s in enumerate(states)], axis=1)
        from distvi.local_terms import local_values

        return local_values(ad, {v: u.reshape((draws, *v.shape)) for v, u in zip(ad.locals, arrays)},
                            flat, include_transformed)

    def sample(self, draws: int = 500, random_seed: int | None = None,
               return_inferencedata: bool = True, include_transformed: bool = False,
               psis: bool = False, psis_draws: int | None = None, include_locals: bool = True):
        """Draws from q in the constrained space, with the model's deterministics.

        With ``psis=True``: importance-resampled draws. ``psis_draws`` (default
        ``max(draws, 1000)``) draws of q are weighted by their Pareto-smoothed importance
        ratios against the full-data posterior (see :meth:`diagnose`) and ``draws`` of them
        are picked by weight, with replacement; refused when k̂ > 0.7. The picked draws'
        normalized weights are in ``sample_stats["psis_weight"]`` and k̂, the weights' ESS and
        the verdict in the group's attributes. ``include_locals=False`` leaves local variables
        out (their draws are refused over ``LOCAL_DRAWS_MAX_MB``, naming the size).

        Returns
        -------
        arviz.InferenceData
            A posterior group of one chain and ``draws`` draws, using the model's coords and
            dims (the transformed value variables too with ``include_transformed=True``).
        pymc.backends.base.MultiTrace
            With ``return_inferencedata=False``, as PyMC returns: one chain of ``draws`` draws
            of the value variables (transformed ones included, whatever
            ``include_transformed`` says, as in PyMC), the free variables in the constrained
            space and the deterministics, in PyMC's order; with ``psis=True`` the weights are
            its sampler stat ``psis_weight``.
        """
        import arviz as az

        if not is_int(draws) or draws < 1:
            raise ValueError(f"draws must be a positive int, got {draws!r}")
        ad = self.require_bound()
        rng = np.random.default_rng(random_seed)
        stats = None
        if psis:
            from distvi import diagnostics

            pool = diagnostics.check_draws(max(int(draws), 1000) if psis_draws is None else psis_draws)
            diag = diagnostics.diagnose(self, pool, random_seed=int(rng.integers(2**62)))
            picked = diagnostics.resample(int(draws), diag, rng)
            flat = diag.points[picked]
            weights = diag.weights / diag.weights.sum()
            stats = {"psis_weight": weights[picked][None]}
        else:
            flat = self.draw_flat(int(draws), rng)
        if not return_inferencedata:
            values = ad.constrained_fn(True)(flat)
            if include_locals:
                values.update(self._local_draws(int(draws), rng, flat, True))
            values.update(self._data_deterministics(flat))
            return self._multitrace(values, stats)
        values = ad.constrained_fn(include_transformed)(flat)
        if include_locals:
            values.update(self._local_draws(int(draws), rng, flat, include_transformed))
        values.update(self._data_deterministics(flat))
        dims, coords = ad.dims_and_coords(values)
        posterior = {k: np.asarray(v)[None] for k, v in values.items()}
        idata = az.from_dict(posterior=posterior, sample_stats=stats, dims=dims, coords=coords)
        if psis:
            idata.sample_stats.attrs.update({"psis_khat": diag.khat, "psis_ess": diag.ess,
                                             "psis_draws": diag.draws, "psis_verdict": diag.verdict})
        return idata

    def _multitrace(self, values: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray] | None):
        """Draws by name (leading draw axis) as PyMC's one-chain ``MultiTrace``, its variables in
        the order of ``model.unobserved_value_vars`` (value variables, constrained transformed
        variables, deterministics)."""
        from pymc.backends.base import MultiTrace
        from pymc.backends.ndarray import NDArray

        model = self.adapter.model
        free = model.free_RVs
        order = ([model.rvs_to_values[rv] for rv in free]
                 + [rv for rv in free if model.rvs_to_transforms[rv] is not None]
                 + list(model.deterministics))
        tracked = [v for v in order if v.name in values]
        arrays = {v.name: np.asarray(values[v.name]) for v in tracked}
        n = len(next(iter(arrays.values())))

        def not_recording(*point):
            raise TypeError("a trace of draws from q records no further points")

        trace = NDArray(model=model, vars=tracked, fn=not_recording,
                        var_shapes={k: a.shape[1:] for k, a in arrays.items()},
                        var_dtypes={k: a.dtype for k, a in arrays.items()})
        trace.setup(n, chain=0, sampler_vars=None if stats is None else
                    [{k: np.asarray(w).dtype for k, w in stats.items()}])
        for k, a in arrays.items():
            trace.samples[k][...] = a
        for k, w in (stats or {}).items():
            trace._stats[0][k][...] = np.asarray(w).reshape(n)
        trace.draw_idx = n
        trace.close()
        return MultiTrace([trace])

    def _data_deterministics(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The deterministics that depend on the data, at the draws ``flat``: computed on the
        fit's shard workers (or here, from the data attached, outside a fit), rows in order.
        Those that cannot be (not row by row, or over :data:`DETERMINISTICS_MAX_MB` for these
        draws) are left out with one warning that names them."""
        import warnings

        ad = self.require_bound()
        term, others = ad.data_deterministics()
        out: dict[str, np.ndarray] = {}
        if ad.locals:
            left = [*(term.names if term is not None else ()), *others, *ad.local_deterministics()[1]]
            if left:
                warnings.warn(f"deterministics {left} depend on the data or on local variables: "
                              "with local variables they are not computed yet and are left out "
                              "of the draws", stacklevel=3)
            return out
        if term is not None:
            n_rows = getattr(self.source, "n_rows", 0)
            trailing = [int(np.prod([s or 1 for s in o.type.shape[1:]], dtype=int))
                        for o in term.outputs]
            mb = flat.shape[0] * n_rows * sum(trailing) * 8 / 2**20
            if mb > DETERMINISTICS_MAX_MB:
                warnings.warn(
                    f"deterministics {list(term.names)} depend on the data and would take "
                    f"{mb:.0f} MB for {flat.shape[0]} draws (limit distvi.results."
                    f"DETERMINISTICS_MAX_MB = {DETERMINISTICS_MAX_MB}): they are left out of "
                    "the draws; take fewer draws, raise the limit, or compute them from the "
                    "draws with approx.sample_node(...) on the rows you need", stacklevel=3)
            else:
                if self.shard_data is not None:
                    arrays = self.shard_data.deterministics(term, flat)
                else:
                    rows = self.source.read(0, n_rows)
                    arrays = term.compile(flat.shape[0])(np.ascontiguousarray(flat), *rows.values())
                out.update(zip(term.names, (np.asarray(a) for a in arrays)))
        if others:
            warnings.warn(
                f"deterministics {others} depend on the data but not row by row (e.g. a sum "
                "over the rows), which sharded rows cannot give: they are left out of the "
                "draws; compute them from the draws with approx.sample_node(...)",
                stacklevel=3)
        return out


def sample_approx(approx, draws: int = 100, include_transformed: bool = True,
                  random_seed: int | None = None):
    """Draw from a fitted approximation (PyMC's ``sample_approx``): InferenceData with the
    free variables, deterministics and, by default, the transformed value variables."""
    return approx.sample(draws=draws, include_transformed=include_transformed,
                         random_seed=random_seed)
