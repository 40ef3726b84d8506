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
# draws of data-dependent deterministics that approx.sample() computes on the workers, at most
DETERMINISTICS_MAX_MB = 512


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def softplus_inv(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype="float64")
    return y + np.log(-np.expm1(-y))


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


LATER = object()  # ``model=LATER``: bound by the Inference that makes the approximation


class SharedParams(dict):
    """A group's parameters: PyTensor shared variables by name, as in PyMC.

    ``params[name]`` gives the current value (an array); assigning a value sets the shared
    variable, which keeps its identity, so symbolic graphs built on it (``sample_node``,
    ``logq``, callbacks written for PyMC) see every update.
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.shared: dict[str, Any] = {}
        for k, v in (values or {}).items():
            self[k] = v

    def __getitem__(self, key: str) -> np.ndarray:
        return self.shared[key].get_value(borrow=True)

    def get(self, key, default=None):
        return self[key] if key in self.shared else default

    def __setitem__(self, key: str, value: Any) -> None:
        import pytensor

        value = np.asarray(value, dtype="float64")
        var = self.shared.get(key)
        if var is None or var.type.ndim != value.ndim:
            self.shared[key] = pytensor.shared(value.copy(), name=key,
                                               shape=(None,) * value.ndim)
        else:
            var.set_value(value, borrow=True)
        super().__setitem__(key, None)

    def __contains__(self, key) -> bool:
        return key in self.shared

    def __reduce__(self):  # rebuilt from the values (a dict's default pickling sets items first)
        return (SharedParams, ({k: np.array(self[k]) for k in self.shared},))

    def items(self):
        return [(k, self[k]) for k in self.shared]

    def values(self):
        return [self[k] for k in self.shared]

    def __iter__(self):
        return iter(self.shared)

    def __repr__(self) -> str:
        return f"SharedParams({ {k: self[k] for k in self.shared} !r})"


def _family_for(vfam: str | None, params: Mapping[str, Any] | None) -> str:
    """The family key for PyMC's spellings (case-insensitive) or the names of ``params``."""
    if vfam is not None:
        if not isinstance(vfam, str):
            raise TypeError(f"vfam must be a str, got {type(vfam).__name__}")
        key = vfam.lower()
        if key not in FAMILIES:
            raise KeyError(f"unknown vfam {vfam!r}; valid (any case): {sorted(FAMILIES)}")
        if params is not None and set(params) != set(FAMILIES[key].param_names):
            raise TypeError(f"params {sorted(params)} do not belong to a {FAMILIES[key].name} group, which "
                            f"takes {list(FAMILIES[key].param_names)}")
        return FAMILIES[key].name
    if params is None:
        return "mean_field"
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    for key, fam in FAMILIES.items():
        if set(params) == set(fam.param_names):
            return fam.name
    raise KeyError(f"no group takes the params {sorted(params)}: mean_field takes ['mu', 'rho'], "
                   "full_rank ['mu', 'L_tril'], empirical ['histogram']")


# ---------------------------------------------------------------------------- groups
class Group:
    """Some of the model's free variables and the family that approximates them.

    Parameters
    ----------
    group
        Variables (names or the model's random variables); ``None`` takes every variable no
        other group claims.
    vfam
        ``"mean_field"`` (``"mf"``), ``"full_rank"`` (``"fr"``) or ``"empirical"``, in any
        case, as PyMC spells them. Without it the family follows ``params`` (``L_tril``:
        full rank, ``histogram``: empirical), else mean-field.
    params
        Initial parameters by name (``mu``/``rho``, ``mu``/``L_tril``, ``histogram``).
    size, random_seed
        For ``"empirical"`` without ``params``: the number of particles (required) and the
        seed of their jitter (as ``options``).
    model
        The model whose variables the group names (default: the model on the context stack,
        when there is one).
    start, start_sigma
        Initial mean (constrained values by variable name, or unconstrained by value-variable
        name) and initial standard deviations (unconstrained space, by variable name).
    options
        For ``"empirical"``: ``size`` (particles), ``jitter`` (their initial spread around
        ``start``) and ``random_seed``.
    """

    family_name: str | None = None  # set by the subclass of each family

    def __new__(cls, group=None, vfam=None, params=None, *args, **kwargs):
        # as PyMC's: Group(...) is an instance of the family's class (MeanFieldGroup, ...)
        if cls is Group:
            cls = GROUP_CLASSES[_family_for(vfam, params)]
        return super().__new__(cls)

    @classmethod
    def get_param_spec_for(cls, d: int, s: int | None = None) -> dict:
        """The shapes of the family's parameters for ``d`` variables (and ``s`` draws)."""
        if cls.family_name is None:
            raise TypeError("get_param_spec_for needs a family: MeanFieldGroup, FullRankGroup "
                            "or EmpiricalGroup")
        shapes = FAMILIES[cls.family_name].param_shapes(FAMILIES[cls.family_name], int(d))
        return {k: tuple(s if v is None else v for v in shape) for k, shape in shapes.items()}

    def __init__(
        self,
        group: Sequence[Any] | None = None,
        vfam: str | None = None,
        params: Mapping[str, Any] | None = None,
        size: int | None = None,
        random_seed: int | None = None,
        model: Any = None,
        options: Mapping[str, Any] | None = None,
        start: Mapping[str, Any] | None = None,
        start_sigma: Mapping[str, Any] | None = None,
        jitter: float | None = None,
    ) -> None:
        fixed = type(self).family_name
        if fixed is not None and vfam is None and params is None:
            vfam = fixed
        vfam = _family_for(vfam, params)
        if fixed is not None and vfam != fixed:
            raise TypeError(f"a {type(self).__name__} is a {fixed} group, not {vfam}")
        options = dict(options or {})
        for key, value in (("size", size), ("random_seed", random_seed), ("jitter", jitter)):
            if value is not None:
                if vfam != "empirical":
                    raise TypeError(f"{key}= applies to an empirical group, not a {vfam} one")
                options[key] = value
        if vfam == "empirical" and params is None and options.get("size") is None:
            raise ValueError("an empirical group needs its draws (params={'histogram': ...}) "
                             "or a number of particles (size=...)")
        try:
            self.family = FAMILIES[vfam](**options)
        except TypeError as err:
            raise TypeError(f"options {sorted(options)} do not apply to a {vfam} group "
                            f"(empirical takes size, jitter, random_seed): {err}") from None
        self.names = None if group is None else [getattr(v, "name", v) for v in group]
        if self.names is not None and not all(isinstance(n, str) for n in self.names):
            raise TypeError("group must list variables or their names")
        self._init_params = dict(params) if params else None
        self.start, self.start_sigma = start, start_sigma
        self.model = model
        self.layout = None
        self.indices = None
        self._params = SharedParams()

    @property
    def params(self) -> SharedParams:
        """The parameters by name: values on reading, shared variables in ``shared_params``."""
        return self._params

    @params.setter
    def params(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self._params[k] = v

    @property
    def shared_params(self) -> dict:
        """The parameters as PyTensor shared variables, by name (as PyMC's
        ``group.shared_params``): ``set_value`` on them sets the group's parameters."""
        return dict(self._params.shared)

    @shared_params.setter
    def shared_params(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self._params[k] = v.get_value() if hasattr(v, "get_value") else v

    @property
    def group(self) -> list:
        """The group's variables: the model's random variables once bound (as PyMC's
        ``group.group``), else the names given (``None``: the rest)."""
        if self.layout is None:
            return self.names
        model = self.model
        names = [lay.rv_name for lay in self.layout]
        if model is not None and hasattr(model, "named_vars"):
            return [model.named_vars.get(n, n) for n in names]
        return names

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


class MeanFieldGroup(Group):
    """A mean-field group (``Group(..., vfam="mean_field")`` is one)."""

    family_name = "mean_field"


class FullRankGroup(Group):
    """A full-rank group (``Group(..., vfam="full_rank")`` is one)."""

    family_name = "full_rank"


class EmpiricalGroup(Group):
    """A group of draws or particles (``Group(..., vfam="empirical")`` is one)."""

    family_name = "empirical"


GROUP_CLASSES = {"mean_field": MeanFieldGroup, "full_rank": FullRankGroup,
                 "empirical": EmpiricalGroup}


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
        self.adapter = None
        self.source = None  # the data it is fitted to (set by the Inference)
        self.scale_cost_to_minibatch = False
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
        return _param(m, self, "mean")

    @property
    def cov(self) -> ParamArray:
        """Covariance of q, flat, unconstrained (block diagonal across groups)."""
        self._require_bound()
        c = np.zeros((self.ndim, self.ndim))
        for g in self.groups:
            c[np.ix_(g.indices, g.indices)] = g.family.cov(g.params)
        return _param(c, self, "cov")

    @property
    def std(self) -> ParamArray:
        """Standard deviations of q, flat, unconstrained (no D x D matrix for mean-field)."""
        self._require_bound()
        v = np.zeros(self.ndim)
        for g in self.groups:
            v[g.indices] = g.family.var(g.params)
        return _param(np.sqrt(v), self, "std")

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

    def logq_at(self, points: np.ndarray) -> np.ndarray:
        """Log density of q at flat unconstrained points (S, D) -> (S,), numerically."""
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
        if not return_inferencedata:
            values = ad.constrained_fn(True)(flat)
            values.update(self._data_deterministics(flat))
            return self._multitrace(values, stats)
        values = ad.constrained_fn(include_transformed)(flat)
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

        ad = self._require_bound()
        term, others = ad.data_deterministics()
        out: dict[str, np.ndarray] = {}
        if term is not None:
            n_rows = getattr(self.source, "n_rows", 0)
            trailing = [int(np.prod([s or 1 for s in o.type.shape[1:]], dtype=int))
                        for o in term.outputs]
            mb = flat.shape[0] * n_rows * sum(trailing) * 8 / 2**20
            if mb > DETERMINISTICS_MAX_MB:
                warnings.warn(
                    f"deterministics {list(term.names)} depend on the data and would take "
                    f"{mb:.0f} MB for {flat.shape[0]} draws (limit distvi.approximations."
                    f"DETERMINISTICS_MAX_MB = {DETERMINISTICS_MAX_MB}): they are left out of "
                    "the draws; take fewer draws, raise the limit, or compute them from the "
                    "draws with approx.sample_node(...) on the rows you need", stacklevel=3)
            else:
                inference = getattr(self, "_inference", None)
                if inference is not None:
                    arrays = inference.data_deterministics(term, flat)
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

    def diagnose(self, draws: int = 1000, random_seed: int | None = None):
        """PSIS k̂ of q against the full-data posterior (Yao et al. 2018): see
        :func:`distvi.diagnostics.diagnose`. The shard workers evaluate the whole data."""
        from distvi.diagnostics import diagnose

        return diagnose(self, draws, random_seed)

    # -------------------------------------------------------------- symbolic (PyMC's API)
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

        self._require_bound()
        if isinstance(size, Variable):  # a symbolic size, as PyMC takes: given at evaluation
            n = pt.as_tensor(size).astype("int64")
        else:
            n = 1 if size is None else int(size)
            if n < 1:
                raise ValueError(f"size must be >= 1, got {size}")
        symbolic_det = isinstance(deterministic, Variable)
        # one generator, drawn from in draw_flat's order (the normals of every group, then an
        # Empirical group's picks), so a first evaluation equals sample(random_seed=...)'s draws
        rng = pytensor.shared(np.random.default_rng(random_seed))
        state = rng
        sym = self._group_params(self._shared_inputs())
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
            hist = p["histogram"]
            at_mean = pt.repeat(hist.mean(axis=0, keepdims=True), n, axis=0)
            if deterministic is True:
                parts.append(at_mean)
                continue
            state, idx = pt.random.integers(0, hist.shape[0], size=(n,), rng=state).owner.outputs
            picked = hist[idx]
            parts.append(pt.switch(pt.as_tensor(deterministic).astype("bool"), at_mean, picked)
                         if symbolic_det else picked)
        if state is not rng:
            rng.default_update = state
        z = parts[0] if len(parts) == 1 else pt.concatenate(parts, axis=1)
        return z if self._identity else z[:, self._inverse]

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
        ad = self._require_bound()
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

    def _data_and_prior(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full-data log-likelihood (on the fit's workers when there is a fit, else read
        here) and the prior term at flat points (S, D)."""
        ad = self._require_bound()
        n = points.shape[0]
        cache = self.__dict__.setdefault("_prior_fns", {})
        if n not in cache:
            cache[n] = ad.compile_prior_term(n)
        prior = cache[n](points)[0]
        inference = getattr(self, "_inference", None)
        if inference is not None:
            return inference.full_data_logp(points), prior
        if self.source is None or not getattr(self.source, "n_rows", 0):
            return np.zeros(n), prior
        rows = self.source.read(0, self.source.n_rows)
        logp = ad.data_term().compile(n, True, False)(points, *rows.values(), np.array(1.0))[0]
        return logp, prior

    def mc_loss(self, n_mc: int, beta: float = 1.0, rng: np.random.Generator | None = None) -> float:
        """A Monte-Carlo estimate of the loss ``-datalogp + beta (logq - varlogp)`` (the
        negative ELBO for ``beta=1``) from ``n_mc`` draws of q, on all the data; divided by
        ``N / B`` when :attr:`scale_cost_to_minibatch` is set, as PyMC reports it."""
        if isinstance(n_mc, bool) or not isinstance(n_mc, int | np.integer) or n_mc < 1:
            raise ValueError(f"the number of draws must be an int >= 1, got {n_mc!r}")
        rng = np.random.default_rng() if rng is None else rng
        points = self.draw_flat(int(n_mc), rng)
        data, prior = self._data_and_prior(points)
        loss = float(np.mean(-data + beta * (self.logq_at(points) - prior)))
        inference = getattr(self, "_inference", None)
        if self.scale_cost_to_minibatch and inference is not None:
            loss /= inference._cost_divisor()
        return loss


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
