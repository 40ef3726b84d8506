"""Variational families, groups of variables, and the approximation they make together.

A family describes q for one group of value variables in the flat unconstrained space:
its parameters (plain arrays), how to draw from it given standard normals, its entropy and
log density (symbolic, for the driver's compiled step) and its moments (numeric).
An :class:`Approximation` is a list of groups covering every free variable once; the
groups are fitted together (each group's draws land in its variables' slots of the flat
vector).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytensor.tensor as pt
import xarray as xr

LOG_2PI = float(np.log(2 * np.pi))


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def softplus_inv(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype="float64")
    return y + np.log(-np.expm1(-y))


class ParamArray(np.ndarray):
    """A numpy array that also answers ``.eval()``, as PyMC's symbolic moments do."""

    def eval(self, *args, **kwargs) -> np.ndarray:
        return np.asarray(self)


def _param(x: np.ndarray) -> ParamArray:
    return np.asarray(x, dtype="float64").view(ParamArray)


# ---------------------------------------------------------------------------- families
class MeanFieldFamily:
    """Independent normals: ``z = mu + softplus(rho) * eps``."""

    name = "mean_field"
    param_names = ("mu", "rho")

    def init(self, mean: np.ndarray, sigma: np.ndarray | None) -> dict[str, np.ndarray]:
        rho = np.zeros_like(mean) if sigma is None else softplus_inv(sigma)
        return {"mu": mean.copy(), "rho": rho}

    def draw(self, p, eps):
        return p["mu"] + pt.softplus(p["rho"]) * eps

    def entropy(self, p):
        d = p["mu"].type.shape[0]
        return pt.sum(pt.log(pt.softplus(p["rho"]))) + 0.5 * d * (1.0 + LOG_2PI)

    def logq(self, p, z):
        sigma = pt.softplus(p["rho"])
        r = (z - p["mu"]) / sigma
        return pt.sum(-0.5 * r**2 - pt.log(sigma) - 0.5 * LOG_2PI, axis=-1)

    def param_shapes(self, d: int) -> dict:
        return {"mu": (d,), "rho": (d,)}

    def mean(self, p) -> np.ndarray:
        return p["mu"]

    def var(self, p) -> np.ndarray:
        return softplus(p["rho"]) ** 2

    def cov(self, p) -> np.ndarray:
        return np.diag(self.var(p))

    def draw_numeric(self, p, eps: np.ndarray, rng) -> np.ndarray:
        return p["mu"] + softplus(p["rho"]) * eps


def tril_size(d: int) -> int:
    return d * (d + 1) // 2


class FullRankFamily:
    """A multivariate normal: ``z = mu + L eps``, ``L`` lower triangular, packed row-major
    (``np.tril_indices``) in ``L_tril``, with softplus on its diagonal."""

    name = "full_rank"
    param_names = ("mu", "L_tril")

    @staticmethod
    def _diag_positions(d: int) -> np.ndarray:
        rows, cols = np.tril_indices(d)
        return np.flatnonzero(rows == cols)

    def init(self, mean: np.ndarray, sigma: np.ndarray | None) -> dict[str, np.ndarray]:
        d = mean.shape[0]
        packed = np.eye(d)[np.tril_indices(d)]
        if sigma is not None:
            packed[self._diag_positions(d)] = softplus_inv(sigma)
        return {"mu": mean.copy(), "L_tril": packed}

    def param_shapes(self, d: int) -> dict:
        return {"mu": (d,), "L_tril": (tril_size(d),)}

    def L(self, p):
        # one flat index vector and a constant mask: PyTensor compiles these to C ops (row and
        # column fancy indices would run as Python ops, ~30 µs a step at any size)
        d = p["mu"].type.shape[0]
        rows, cols = np.tril_indices(d)
        on_diag = pt.as_tensor(rows == cols)
        packed = pt.switch(on_diag, pt.softplus(p["L_tril"]), p["L_tril"])
        return pt.set_subtensor(pt.zeros(d * d)[rows * d + cols], packed).reshape((d, d))

    def draw(self, p, eps):
        return p["mu"] + eps @ self.L(p).T

    def entropy(self, p):
        d = p["mu"].type.shape[0]
        diag = self._diag_positions(d)
        return pt.sum(pt.log(pt.softplus(p["L_tril"][diag]))) + 0.5 * d * (1.0 + LOG_2PI)

    def logq(self, p, z):
        L = self.L(p)
        r = pt.linalg.solve_triangular(L, (z - p["mu"]).T, lower=True).T
        d = p["mu"].type.shape[0]
        return (
            pt.sum(-0.5 * r**2, axis=-1)
            - pt.sum(pt.log(pt.diagonal(L)))
            - 0.5 * d * LOG_2PI
        )

    def L_numeric(self, p) -> np.ndarray:
        d = p["mu"].shape[0]
        L = np.zeros((d, d))
        L[np.tril_indices(d)] = p["L_tril"]
        idx = np.arange(d)
        L[idx, idx] = softplus(L[idx, idx])
        return L

    def mean(self, p) -> np.ndarray:
        return p["mu"]

    def cov(self, p) -> np.ndarray:
        L = self.L_numeric(p)
        return L @ L.T

    def var(self, p) -> np.ndarray:
        return np.sum(self.L_numeric(p) ** 2, axis=1)

    def draw_numeric(self, p, eps: np.ndarray, rng) -> np.ndarray:
        return p["mu"] + eps @ self.L_numeric(p).T


class EmpiricalFamily:
    """A set of draws or particles (``histogram``: T x d); q is their empirical distribution.

    Without given draws, ``size`` particles start at the group's start point plus normal
    noise of standard deviation ``jitter``, drawn from ``random_seed`` (None: fresh entropy).
    """

    name = "empirical"
    param_names = ("histogram",)

    def __init__(self, size: int | None = None, jitter: float = 1.0,
                 random_seed: int | None = None) -> None:
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int | np.integer):
                raise TypeError(f"size must be an int, got {type(size).__name__}")
            if size < 1:
                raise ValueError(f"size must be >= 1, got {size}")
        jitter_ok = not isinstance(jitter, bool) and isinstance(jitter, int | float | np.integer | np.floating)
        if not jitter_ok:
            raise TypeError(f"jitter must be a number, got {type(jitter).__name__}")
        if not (jitter >= 0 and np.isfinite(jitter)):
            raise ValueError(f"jitter must be a finite number >= 0, got {jitter}")
        from distvi._rng import check_seed

        self.size = None if size is None else int(size)
        self.jitter = float(jitter)
        self.seed = check_seed(random_seed)

    def param_shapes(self, d: int) -> dict:
        return {"histogram": (None, d)}

    def init(self, mean, sigma):
        if self.size is None:
            raise ValueError("an Empirical group needs its draws (params={'histogram': ...}) or a size")
        from distvi._rng import INIT_STREAM, Stream

        noise = Stream(self.seed, INIT_STREAM).normal((self.size, mean.shape[0]), 0)
        return {"histogram": mean[None, :] + self.jitter * noise}

    def draw(self, p, eps):
        # the particles are the points (eps is not used)
        return p["histogram"]

    def mean(self, p) -> np.ndarray:
        return p["histogram"].mean(axis=0)

    def cov(self, p) -> np.ndarray:
        h = p["histogram"]
        return np.atleast_2d(np.cov(h, rowvar=False, bias=True))

    def var(self, p) -> np.ndarray:
        return p["histogram"].var(axis=0)

    def draw_numeric(self, p, eps: np.ndarray, rng) -> np.ndarray:
        h = p["histogram"]
        return h[rng.integers(0, h.shape[0], eps.shape[0])]


FAMILIES = {
    "mean_field": MeanFieldFamily,
    "mf": MeanFieldFamily,
    "full_rank": FullRankFamily,
    "fr": FullRankFamily,
    "empirical": EmpiricalFamily,
}


# ---------------------------------------------------------------------------- groups
class Group:
    """Some of the model's free variables and the family that approximates them.

    Parameters
    ----------
    group
        Variables (names or the model's random variables); ``None`` takes every variable no
        other group claims.
    vfam
        ``"mean_field"`` (``"mf"``), ``"full_rank"`` (``"fr"``) or ``"empirical"``.
    params
        Initial parameters by name (``mu``/``rho``, ``mu``/``L_tril``, ``histogram``).
    start, start_sigma
        Initial mean (constrained values by variable name, or unconstrained by value-variable
        name) and initial standard deviations (unconstrained space, by variable name).
    options
        For ``"empirical"``: ``size`` (particles), ``jitter`` (their initial spread around
        ``start``) and ``random_seed``.
    """

    def __init__(
        self,
        group: Sequence[Any] | None = None,
        vfam: str = "mean_field",
        params: Mapping[str, Any] | None = None,
        start: Mapping[str, Any] | None = None,
        start_sigma: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if vfam not in FAMILIES:
            raise KeyError(f"unknown vfam {vfam!r}; valid: {sorted(FAMILIES)}")
        try:
            self.family = FAMILIES[vfam](**dict(options or {}))
        except TypeError as err:
            raise TypeError(f"options {sorted(options or {})} do not apply to a {vfam} group "
                            f"(empirical takes size, jitter, random_seed): {err}") from None
        self.names = None if group is None else [getattr(v, "name", v) for v in group]
        if self.names is not None and not all(isinstance(n, str) for n in self.names):
            raise TypeError("group must list variables or their names")
        self._init_params = dict(params) if params else None
        self.start, self.start_sigma = start, start_sigma
        self.layout = None
        self.indices = None
        self.params: dict[str, np.ndarray] = {}

    @property
    def vfam(self) -> str:
        return self.family.name

    @property
    def ndim(self) -> int:
        return 0 if self.indices is None else len(self.indices)

    def bind(self, adapter, names: list[str]) -> None:
        """Resolve the group's variables against the model and set initial parameters."""
        self.layout = [adapter.var(n) for n in names]
        self.indices = np.concatenate(
            [np.arange(lay.start, lay.stop) for lay in self.layout]
        ) if self.layout else np.zeros(0, dtype=int)
        d = len(self.indices)
        if self._init_params is not None:
            expected = self.family.param_shapes(d)
            self.params = {}
            for key in self.family.param_names:
                if key not in self._init_params:
                    raise KeyError(f"params for a {self.vfam} group need {self.family.param_names}")
                value = np.array(self._init_params[key], dtype="float64")
                want = expected[key]
                if value.shape != want and not (want[0] is None and value.shape[1:] == want[1:]):
                    raise ValueError(
                        f"param {key!r} of the {self.vfam} group has the wrong size: shape "
                        f"{value.shape}, expected {tuple('T' if w is None else w for w in want)}"
                    )
                self.params[key] = value
            return
        mean = adapter.flat_from_start(self.start)[self.indices]
        sigma = None
        if self.start_sigma:
            # variables not named keep the family's own default spread
            sigma = np.sqrt(self.family.var(self.family.init(mean, None)))
            offset = {lay.name: i for lay, i in zip(self.layout, np.cumsum([0] + [l.size for l in self.layout]))}
            for key, value in self.start_sigma.items():
                lay = adapter.var(key)
                if lay.name not in offset:
                    raise KeyError(f"start_sigma names {key!r}, which is not in this group")
                s = np.broadcast_to(np.asarray(value, dtype="float64"), lay.shape).ravel()
                if np.any(~(s > 0)):
                    raise ValueError(f"start_sigma for {key!r} must be > 0")
                sigma[offset[lay.name]:offset[lay.name] + lay.size] = s
        self.params = self.family.init(mean, sigma)


# ---------------------------------------------------------------------------- approximation
class Approximation:
    """Groups of variables fitted together; q is the product of the groups' families.

    Parameters are plain arrays (``approx.params_values``) that the driver replaces at
    every step. Moments and draws are in the flat unconstrained space of the model (PyMC's
    variable order) unless said otherwise.
    """

    def __init__(self, groups: Sequence[Group], model: Any = None) -> None:
        if not groups:
            raise ValueError("an Approximation needs at least one Group")
        self.groups = list(groups)
        self.model = model
        self.adapter = None
        self.source = None  # the data it is fitted to (set by the Inference)

    # -------------------------------------------------------------- binding
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
        order = np.concatenate([g.indices for g in self.groups])
        self._inverse = np.argsort(order)
        self._identity = bool(np.array_equal(order, np.arange(adapter.ndim)))

    def _require_bound(self):
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
        """The parameters as PyTensor shared variables holding the current values."""
        import pytensor

        return [pytensor.shared(np.array(v), name=k) for (_, k), v in zip(self.param_keys, self.params_values)]

    @property
    def ndim(self) -> int:
        return self._require_bound().ndim

    @property
    def all_histograms(self) -> bool:
        """Whether every group is Empirical (the points are then the particles)."""
        return all(g.vfam == "empirical" for g in self.groups)

    @property
    def joint_histogram(self) -> np.ndarray:
        """The particles of an all-Empirical approximation, (T, D) in the model's flat order."""
        self._require_bound()
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

    def full_logp_and_grad(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log density of the model over all its data, and its gradient, at flat points (S, D).

        Evaluated in this process (the data is read here): for inspection, e.g.
        :class:`~distvi.stein.Stein`; fits evaluate the data term on their workers.
        """
        ad = self._require_bound()
        source = getattr(self, "source", None)
        if source is None:
            raise RuntimeError("the approximation has no data attached: fit it, or build it "
                               "with data=...")
        pts = np.ascontiguousarray(np.atleast_2d(np.asarray(points, dtype="float64")))
        rows = source.read(0, source.n_rows)
        logp, grad = ad.data_term().compile(pts.shape[0])(pts, *rows.values(), np.array(1.0))
        plogp, pgrad = ad.compile_prior_term(pts.shape[0])(pts)
        return logp + plogp, grad + pgrad

    def param_names_flat(self) -> list[str]:
        """Variable names for each flat coordinate (for error messages)."""
        ad = self._require_bound()
        names = [""] * ad.ndim
        for lay in ad.layout:
            for i in range(lay.start, lay.stop):
                names[i] = lay.rv_name
        return names

    # -------------------------------------------------------------- symbolic (driver step)
    def symbolic_points(self, params: Sequence, eps):
        """Draws (S, D) in the model's flat order from symbolic params and standard normals
        (for Empirical groups: their particles)."""
        sym = self._group_params(params)
        parts, offset = [], 0
        for g, p in zip(self.groups, sym):
            parts.append(g.family.draw(p, eps[:, offset:offset + g.ndim]))
            offset += g.ndim
        z = parts[0] if len(parts) == 1 else pt.concatenate(parts, axis=1)
        return z if self._identity else z[:, self._inverse]

    def symbolic_entropy(self, params: Sequence):
        return sum(g.family.entropy(p) for g, p in zip(self.groups, self._group_params(params)))

    def symbolic_logq(self, params: Sequence, z):
        total, sym = 0, self._group_params(params)
        for g, p in zip(self.groups, sym):
            total = total + g.family.logq(p, z[:, g.indices])
        return total

    def _group_params(self, params: Sequence) -> list[dict]:
        out = [dict() for _ in self.groups]
        for (gi, k), v in zip(self.param_keys, params):
            out[gi][k] = v
        return out

    # -------------------------------------------------------------- numeric
    @property
    def mean(self) -> ParamArray:
        """Mean of q, flat, unconstrained."""
        self._require_bound()
        m = np.zeros(self.ndim)
        for g in self.groups:
            m[g.indices] = g.family.mean(g.params)
        return _param(m)

    @property
    def cov(self) -> ParamArray:
        """Covariance of q, flat, unconstrained (block diagonal across groups)."""
        self._require_bound()
        c = np.zeros((self.ndim, self.ndim))
        for g in self.groups:
            c[np.ix_(g.indices, g.indices)] = g.family.cov(g.params)
        return _param(c)

    @property
    def std(self) -> ParamArray:
        """Standard deviations of q, flat, unconstrained (no D x D matrix for mean-field)."""
        self._require_bound()
        v = np.zeros(self.ndim)
        for g in self.groups:
            v[g.indices] = g.family.var(g.params)
        return _param(np.sqrt(v))

    def _by_var(self, flat: np.ndarray) -> xr.Dataset:
        ad = self._require_bound()
        names = [lay.name for lay in ad.layout] + [lay.rv_name for lay in ad.layout]
        dims, coords = ad.dims_and_coords(names)
        out = {}
        for lay in ad.layout:
            d = dims.get(lay.name) or (dims.get(lay.rv_name) if lay.transform is None else None)
            if not d or len(d) != len(lay.shape):
                d = [f"{lay.name}_dim_{i}" for i in range(len(lay.shape))]
            out[lay.name] = xr.DataArray(flat[lay.slice].reshape(lay.shape), dims=d)
        return xr.Dataset(out, coords={k: v for k, v in coords.items()
                                       if any(k in a.dims for a in out.values())})

    @property
    def mean_data(self) -> xr.Dataset:
        """Mean of q by value-variable name."""
        return self._by_var(np.asarray(self.mean))

    @property
    def std_data(self) -> xr.Dataset:
        """Standard deviation of q by value-variable name."""
        return self._by_var(np.asarray(self.std))

    def draw_flat(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        """``draws`` points from q, flat and unconstrained, shape (draws, D)."""
        self._require_bound()
        z = np.empty((draws, self.ndim))
        for g in self.groups:
            eps = rng.standard_normal((draws, g.ndim))
            z[:, g.indices] = g.family.draw_numeric(g.params, eps, rng)
        return z

    def logq(self, points: np.ndarray) -> np.ndarray:
        """Log density of q at flat unconstrained points (S, D) -> (S,)."""
        from distvi._compile import function

        self._require_bound()
        pts = np.atleast_2d(np.asarray(points, dtype="float64"))
        if getattr(self, "_logq_fn", None) is None:  # compiled once; parameters are inputs
            z = pt.matrix("z")
            ins = [pt.tensor(dtype="float64", shape=np.shape(v)) for v in self.params_values]
            self._logq_fn = function([z, *ins], self.symbolic_logq(ins, z))
        return self._logq_fn(pts, *self.params_values)

    def sample(self, draws: int = 500, random_seed: int | None = None,
               return_inferencedata: bool = True, include_transformed: bool = False,
               psis: bool = False, psis_draws: int | None = None):
        """Draws from q in the constrained space, with the model's deterministics.

        With ``psis=True``: importance-resampled draws. ``psis_draws`` (default
        ``max(draws, 1000)``) draws of q are weighted by their Pareto-smoothed importance
        ratios against the full-data posterior (see :meth:`diagnose`) and ``draws`` of them
        are picked by weight, with replacement; refused when k̂ > 0.7. The picked draws'
        normalized weights are in ``sample_stats["psis_weight"]`` and k̂, the weights' ESS and
        the verdict in the group's attributes.

        Returns
        -------
        arviz.InferenceData (or a dict of arrays with ``return_inferencedata=False``) with a
        posterior group of one chain and ``draws`` draws, using the model's coords and dims.
        """
        import arviz as az

        if isinstance(draws, bool) or not isinstance(draws, int | np.integer) or draws < 1:
            raise ValueError(f"draws must be a positive int, got {draws!r}")
        ad = self._require_bound()
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
        values = ad.constrained_fn(include_transformed)(flat)
        if not return_inferencedata:
            return values
        dims, coords = ad.dims_and_coords(values)
        posterior = {k: np.asarray(v)[None] for k, v in values.items()}
        idata = az.from_dict(posterior=posterior, sample_stats=stats, dims=dims, coords=coords)
        if psis:
            idata.sample_stats.attrs.update({"psis_khat": diag.khat, "psis_ess": diag.ess,
                                             "psis_draws": diag.draws, "psis_verdict": diag.verdict})
        return idata

    def diagnose(self, draws: int = 1000, random_seed: int | None = None):
        """PSIS k̂ of q against the full-data posterior (Yao et al. 2018): see
        :func:`distvi.diagnostics.diagnose`. The shard workers evaluate the whole data."""
        from distvi.diagnostics import diagnose

        return diagnose(self, draws, random_seed)

    def sample_node(self, node, size: int | None = None, random_seed: int | None = None):
        """``node`` (an expression of the model's variables) with the free variables drawn from q.

        Returns a symbolic tensor: one draw, or ``size`` draws stacked on a new first axis.
        """
        ad = self._require_bound()
        n = 1 if size is None else int(size)
        z = pt.constant(self.draw_flat(n, np.random.default_rng(random_seed)))
        zp = pt.vector("zp", dtype="float64", shape=(ad.ndim,))
        expr = ad.free_rv_exprs(node, zp)
        from pytensor.graph.replace import graph_replace, vectorize_graph

        if size is None:
            return graph_replace(expr, {zp: z[0]}, strict=False)
        return vectorize_graph(expr, {zp: z})


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

    Either ``trace``: InferenceData (posterior group) or a dict of arrays with a leading draw
    axis, keyed by variable names (constrained values) or value-variable names
    (unconstrained); or ``size`` particles at ``start`` (default: the model's initial point)
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

    adapter, source = adapt(model, data)
    if hasattr(trace, "posterior"):
        post = trace.posterior
        values = {k: np.asarray(post[k]).reshape(-1, *post[k].shape[2:]) for k in post.data_vars}
    elif isinstance(trace, Mapping):
        values = {k: np.asarray(v) for k, v in trace.items()}
    else:
        raise TypeError("Empirical takes InferenceData or a dict of draws")
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
