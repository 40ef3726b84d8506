"""Groups of variables: some of the model's free variables and the family that approximates
them, with the family's parameters as PyTensor shared variables (as in PyMC)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distvi.families import FAMILIES


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


def family_for(vfam: str | None, params: Mapping[str, Any] | None) -> str:
    """The family name for PyMC's spellings of ``vfam`` (any case) or, without it, the one
    whose parameters ``params`` names (default: mean-field)."""
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
        ``start="map"``: the first fit starts from the best Gaussian along an L-BFGS path on
        the full-data log density (see :mod:`distvi.pathfinder`).
    options
        For ``"empirical"``: ``size`` (particles), ``jitter`` (their initial spread around
        ``start``) and ``random_seed``.
    """

    family_name: str | None = None  # set by the subclass of each family

    def __new__(cls, group=None, vfam=None, params=None, *args, **kwargs):
        # as PyMC's: Group(...) is an instance of the family's class (MeanFieldGroup, ...)
        if cls is Group:
            cls = GROUP_CLASSES[family_for(vfam, params)]
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
        vfam = family_for(vfam, params)
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
        if isinstance(start, str) and start != "map":
            raise ValueError(f"start must be a dict of values or 'map', got {start!r}")
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
    def has_own_start(self) -> bool:
        """Whether the group was given a start, start sigmas or parameters."""
        return self.start is not None or bool(self.start_sigma) or self._init_params is not None

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
        mean = adapter.flat_from_start(None if self.start == "map" else self.start)[self.indices]
        sigma = None
        if self.start_sigma:
            # variables not named keep the family's own default spread
            sigma = self.family.evaluate("std", self.family.init(mean, None))
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

