"""The approximation: groups of variables fitted together, q the product of their families.

An :class:`Approximation` is a list of groups (:mod:`distvi.groups`) covering every free
variable once; each group's draws land in its variables' slots of the model's flat
unconstrained vector. Its symbolic draws, entropy and log density are what the driver's
compiled step is built on; its numeric moments and draws are compiled from the same
expressions (:mod:`distvi.families`). Its results (:mod:`distvi.results`), PyMC's symbolic
API (:mod:`distvi.nodes`) and its evaluations on the model's full data
(:mod:`distvi.fulldata`) come from its base classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytensor.tensor as pt

from distvi.fulldata import FullData
from distvi.groups import EmpiricalGroup, FullRankGroup, Group, MeanFieldGroup
from distvi.nodes import SymbolicNodes
from distvi.results import Results

__all__ = ["Approximation", "Empirical", "EmpiricalGroup", "FullRank", "FullRankGroup",
           "Group", "LATER", "MeanField", "MeanFieldGroup", "ParamArray"]


class ParamArray(np.ndarray):
    """A numpy array that also answers ``.eval()``, as PyMC's symbolic moments do: like
    PyMC's, ``approx.mean.eval()`` gives the moment at the *current* parameters (so
    ``Tracker(mean=approx.mean.eval)`` records it at every step), while the array itself is
    the value when it was read."""

    _source: tuple | None = None  # (approximation, property name) the value was read from

    def __array_finalize__(self, obj) -> None:
        self._source = None  # a slice or a result of arithmetic is a plain value

    def get_value(self, *args, **kwargs) -> np.ndarray:
        """As ``eval()`` (PyMC code reads some moments from shared variables)."""
        return self.eval()

    def eval(self, *args, **kwargs) -> np.ndarray:
        if self._source is not None:
            owner, attr = self._source
            return np.asarray(getattr(owner, attr))
        return np.asarray(self)


def _param(x: np.ndarray, owner: Any = None, attr: str | None = None) -> ParamArray:
    out = np.asarray(x, dtype="float64").view(ParamArray)
    if owner is not None:
        out._source = (owner, attr)
    return out


LATER = object()  # ``model=LATER``: bound by the Inference that makes the approximation


class Approximation(Results, SymbolicNodes, FullData):
    """Groups of variables fitted together; q is the product of the groups' families.

    Parameters are plain arrays (``approx.params_values``) that the driver replaces at
    every step. Moments and draws are in the flat unconstrained space of the model (PyMC's
    variable order) unless said otherwise.
    """

    def __init__(self, groups: Sequence[Group], model: Any = None) -> None:
        if not groups:
            raise ValueError("an Approximation needs at least one Group")
        self.groups = list(groups)
        self.adapter = None
        self.source = None  # the data it is fitted to (set by the Inference, see attach)
        self.shard_data = None  # the fit's shard workers over those data
        self.scale_cost_to_minibatch = False
        self.fit_info = None  # the last fit's method, steps, gradient evaluations, convergence
        if model is LATER:  # an Inference binds it to its own model
            self.model = None
            return
        import pymc as pm

        if model is None:  # as PyMC: a group's model, else the one on the context stack
            model = next((g.model for g in self.groups if g.model is not None), None)
        if model is None:
            try:
                model = pm.modelcontext(None)
            except TypeError:
                model = None
        self.model = model
        if isinstance(model, pm.Model):  # bound now: ndim, sample() from the initial params
            from distvi.model import adapt

            adapter, source = adapt(model, None)
            self.bind(adapter)
            self.source = source

    # -------------------------------------------------------------- binding
    def attach(self, shard_data) -> None:
        """Where the full data is: the shard workers of the fit (a
        :class:`~distvi.shard_data.ShardData`, given by the Inference that fits this)."""
        self.shard_data, self.source = shard_data, shard_data.source

    def bind(self, adapter) -> None:
        """Assign every free variable to exactly one group and initialise parameters."""
        all_names = [lay.name for lay in adapter.layout]
        claimed: dict[str, int] = {}
        rest = None
        for gi, g in enumerate(self.groups):
            if g.names is None:
                if rest is not None:
                    raise ValueError("only one Group may take the remaining variables (group=None)")
                rest = gi
                continue
            for n in g.names:
                vn = adapter.var(n).name
                if vn in claimed:
                    raise ValueError(f"variable {n!r} is in more than one group")
                claimed[vn] = gi
        for gi, g in enumerate(self.groups):
            if g.names is None:
                names = [n for n in all_names if n not in claimed]
            else:
                names = [adapter.var(n).name for n in g.names]
            g.bind(adapter, names)
        missing = [n for n in all_names if n not in claimed and rest is None]
        if missing:
            raise ValueError(f"free variables {missing} are in no group; add Group(None, ...)")
        self.adapter = adapter
        for g in self.groups:
            g.model = g.model or getattr(adapter, "user_model", None) or adapter.model
        order = np.concatenate([g.indices for g in self.groups])
        self._inverse = np.argsort(order)
        self._identity = bool(np.array_equal(order, np.arange(adapter.ndim)))

    def require_bound(self):
        if self.adapter is None:
            raise RuntimeError("the approximation is not bound to a model yet (fit it first)")
        return self.adapter

    # -------------------------------------------------------------- parameters
    @property
    def param_keys(self) -> list[tuple[int, str]]:
        return [(gi, k) for gi, g in enumerate(self.groups) for k in g.family.param_names]

    @property
    def params_values(self) -> list[np.ndarray]:
        return [self.groups[gi].params[k] for gi, k in self.param_keys]

    @params_values.setter
    def params_values(self, values: Sequence[np.ndarray]) -> None:
        for (gi, k), v in zip(self.param_keys, values):
            self.groups[gi].params[k] = v

    @property
    def params(self) -> list:
        """The parameters as PyTensor shared variables holding the current values, as PyMC's
        ``approx.params``: the same variables for the whole life of the approximation, so
        ``p.get_value()`` reads and ``p.set_value(x)`` sets the current parameters."""
        return [self.groups[gi].params.shared[k] for gi, k in self.param_keys]

    @property
    def shared_params(self):
        """PyMC's ``shared_params``: for one group its dict of shared variables (``mu``/``rho``,
        ``mu``/``L_tril`` or ``histogram``), for several a list of those dicts."""
        if len(self.groups) == 1:
            return self.groups[0].shared_params
        return [g.shared_params for g in self.groups]

    @shared_params.setter
    def shared_params(self, values) -> None:
        if len(self.groups) == 1:
            self.groups[0].shared_params = values
            return
        for g, v in zip(self.groups, values, strict=True):
            g.shared_params = v

    @property
    def scale_cost_to_minibatch(self) -> bool:
        """PyMC's switch: when True, the loss (and so ``hist`` and the gradients the optimizer
        sees) is divided by ``N / B`` (the full rows over the rows per step), as PyMC reports
        it; when False (distvi's default) it is in full-data units."""
        return self._scale_cost

    @scale_cost_to_minibatch.setter
    def scale_cost_to_minibatch(self, value) -> None:
        if not isinstance(value, bool | np.bool_ | int) or value not in (0, 1):
            raise TypeError(f"scale_cost_to_minibatch must be True or False, got {value!r}")
        self._scale_cost = bool(value)

    @property
    def ndim(self) -> int:
        return self.require_bound().ndim

    @property
    def all_histograms(self) -> bool:
        """Whether every group is Empirical (the points are then the particles)."""
        return all(g.vfam == "empirical" for g in self.groups)

    @property
    def joint_histogram(self) -> np.ndarray:
        """The particles of an all-Empirical approximation, (T, D) in the model's flat order."""
        self.require_bound()
        if not self.all_histograms:
            raise TypeError("joint_histogram needs every group to be Empirical")
        sizes = {g.params["histogram"].shape[0] for g in self.groups}
        if len(sizes) != 1:
            raise ValueError(f"Empirical groups hold different numbers of draws: {sorted(sizes)}")
        out = np.empty((sizes.pop(), self.ndim))
        for g in self.groups:
            out[:, g.indices] = g.params["histogram"]
        return out

    @property
    def histogram(self) -> np.ndarray:
        """The particles (T, D), as PyMC's ``Empirical.histogram``."""
        return self.joint_histogram

    def param_names_flat(self) -> list[str]:
        """Variable names for each flat coordinate (for error messages)."""
        ad = self.require_bound()
        names = [""] * ad.ndim
        for lay in ad.layout:
            for i in range(lay.start, lay.stop):
                names[i] = lay.rv_name
        return names

    # -------------------------------------------------------------- symbolic (driver step)
    def symbolic_points(self, params: Sequence, eps, picks: Sequence | None = None):
        """Draws (S, D) in the model's flat order from symbolic params and standard normals
        ``eps`` (S, D). Empirical groups give their particles, or with ``picks`` (one
        index vector of length S per Empirical group, in group order) those particles."""
        sym = self.group_params(params)
        parts, offset, picked = [], 0, iter(picks or ())
        for g, p in zip(self.groups, sym):
            which = next(picked) if picks is not None and g.vfam == "empirical" else None
            parts.append(g.family.draw(p, eps[:, offset:offset + g.ndim], which))
            offset += g.ndim
        z = parts[0] if len(parts) == 1 else pt.concatenate(parts, axis=1)
        return self.to_flat_order(z)

    def to_flat_order(self, z):
        """Columns of ``z`` (group after group) put in the model's flat order."""
        return z if self._identity else z[:, self._inverse]

    def symbolic_entropy(self, params: Sequence):
        return sum(g.family.entropy(p) for g, p in zip(self.groups, self.group_params(params)))

    def symbolic_logq(self, params: Sequence, z):
        total, sym = 0, self.group_params(params)
        for g, p in zip(self.groups, sym):
            total = total + g.family.logq(p, z[:, g.indices])
        return total

    def group_params(self, params: Sequence) -> list[dict]:
        """The flat list ``params`` (in :attr:`param_keys` order) as one dict per group."""
        out = [dict() for _ in self.groups]
        for (gi, k), v in zip(self.param_keys, params):
            out[gi][k] = v
        return out

    # -------------------------------------------------------------- numeric
    def _moment(self, what: str, attr: str) -> ParamArray:
        self.require_bound()
        D = self.ndim
        out = np.zeros((D, D) if what == "cov" else D)
        for g in self.groups:
            at = np.ix_(g.indices, g.indices) if what == "cov" else g.indices
            out[at] = g.family.evaluate(what, g.params)
        return _param(out, self, attr)

    @property
    def mean(self) -> ParamArray:
        """Mean of q, flat, unconstrained."""
        return self._moment("mean", "mean")

    @property
    def cov(self) -> ParamArray:
        """Covariance of q, flat, unconstrained (block diagonal across groups)."""
        return self._moment("cov", "cov")

    @property
    def std(self) -> ParamArray:
        """Standard deviations of q, flat, unconstrained (no D x D matrix for mean-field)."""
        return self._moment("std", "std")

    def _compiled(self, what: str, build):
        """The function ``build(params)`` returns ``(inputs, output)`` for, compiled once
        for the current parameter shapes (symbolic ``params`` come first among its inputs)."""
        from distvi._compile import function

        shapes = tuple(np.shape(v) for v in self.params_values)
        cache = self.__dict__.setdefault("_fns", {})
        if (what, shapes) not in cache:
            params = [pt.tensor(dtype="float64", shape=s) for s in shapes]
            inputs, output = build(params)
            cache[what, shapes] = function([*params, *inputs], output, on_unused_input="ignore")
        return cache[what, shapes]

    def __getstate__(self) -> dict:
        # compiled functions are rebuilt on demand, not carried; a fit's shard workers belong
        # to its process (an unpickled approximation reads its source itself)
        state = {k: v for k, v in self.__dict__.items() if k != "_fns"}
        if self.shard_data is not None and self.adapter is not None and self.adapter.locals:
            state["local_states"] = self.shard_data.current_local_states()  # the workers' groups
        state["shard_data"] = None
        return state

    def draw_flat(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        """``draws`` points from q, flat and unconstrained, shape (draws, D): the compiled
        :meth:`symbolic_points`, with the normals and an Empirical group's picks drawn from
        ``rng`` group after group (normals, then picks)."""
        self.require_bound()
        eps, picks = [], []
        for g in self.groups:
            eps.append(rng.standard_normal((draws, g.ndim)))
            if g.vfam == "empirical":
                picks.append(rng.integers(0, g.params["histogram"].shape[0], draws))

        def build(params):
            e = pt.matrix("eps", dtype="float64", shape=(None, self.ndim))
            idx = [pt.vector(f"picks{i}", dtype="int64") for i in range(len(picks))]
            return [e, *idx], self.symbolic_points(params, e, idx)

        fn = self._compiled("draw", build)
        return fn(*self.params_values, np.concatenate(eps, axis=1), *picks)

    def logq_at(self, points: np.ndarray) -> np.ndarray:
        """Log density of q at flat unconstrained points (S, D) -> (S,), numerically."""
        self.require_bound()
        pts = np.atleast_2d(np.asarray(points, dtype="float64"))

        def build(params):
            z = pt.matrix("z", dtype="float64")
            return [z], self.symbolic_logq(params, z)

        return self._compiled("logq", build)(*self.params_values, pts)


def MeanField(**kwargs) -> Approximation:
    """A single mean-field group over every free variable."""
    model = kwargs.pop("model", None)
    return Approximation([Group(None, vfam="mean_field", **kwargs)], model=model)


def FullRank(**kwargs) -> Approximation:
    """A single full-rank group over every free variable."""
    model = kwargs.pop("model", None)
    return Approximation([Group(None, vfam="full_rank", **kwargs)], model=model)


def Empirical(trace: Any = None, size: int | None = None, jitter: float = 1.0,
              start: Mapping[str, Any] | None = None, model: Any = None,
              random_seed: int | None = None, data: Any = None) -> Approximation:
    """An approximation made of draws or particles.

    Either ``trace``: InferenceData (posterior group), PyMC's ``MultiTrace`` (every chain,
    one after the other, as PyMC's ``Empirical`` reads it) or a dict of arrays with a leading
    draw axis, keyed by variable names (constrained values) or value-variable names
    (unconstrained; used when both are there); or ``size`` particles at ``start`` (default: the model's initial point)
    plus normal noise of sd ``jitter`` drawn from ``random_seed``, as SVGD starts them.
    """
    if trace is None:
        if size is None:
            raise ValueError("Empirical needs a trace or a size")
        group = Group(None, vfam="empirical", start=start,
                      options={"size": size, "jitter": jitter, "random_seed": random_seed})
        return Approximation([group], model=model)
    if size is not None:
        raise ValueError("give Empirical a trace or a size, not both")
    from distvi.model import adapt

    from pymc.backends.base import MultiTrace

    adapter, source = adapt(model, data)
    if isinstance(trace, MultiTrace):
        values = {k: np.asarray(trace.get_values(k, combine=True, squeeze=True))
                  for k in trace.varnames}
    elif hasattr(trace, "posterior"):
        post = trace.posterior
        values = {k: np.asarray(post[k]).reshape(-1, *post[k].shape[2:]) for k in post.data_vars}
    elif isinstance(trace, Mapping):
        values = {k: np.asarray(v) for k, v in trace.items()}
    else:
        raise TypeError(f"Empirical takes InferenceData, a MultiTrace or a dict of draws, got "
                        f"{type(trace).__name__}")
    n_draws = {v.shape[0] for v in values.values()}
    if len(n_draws) != 1:
        raise ValueError(f"draws of different lengths: {sorted(n_draws)}")
    n = n_draws.pop()
    constrained, flat = {}, np.tile(adapter.initial_point(), (n, 1))
    for lay in adapter.layout:
        if lay.name in values:
            flat[:, lay.slice] = values[lay.name].reshape(n, -1)
        elif lay.rv_name in values:
            constrained[lay.rv_name] = values[lay.rv_name]
        else:
            raise KeyError(f"the draws have no values for {lay.rv_name!r}")
    if constrained:
        unc = adapter.unconstrain(constrained, n_draws=n)
        for lay in adapter.layout:
            if lay.rv_name in constrained:
                flat[:, lay.slice] = unc[:, lay.slice]
    approx = Approximation([Group(None, vfam="empirical", params={"histogram": flat})], model=model)
    approx.bind(adapter)
    approx.source = source
    return approx
