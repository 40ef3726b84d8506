"""The methods: each turns its settings into an approximation and an operator.

``KLqp`` (and ``ADVI``, ``FullRankADVI``) minimise KL(q || p); ``ImplicitGradient`` (and
``SVGD``, ``ASVGD``) move points along the Stein direction of KSD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from distvi import _validate
from distvi._rng import check_seed
from distvi.approximations import LATER, Approximation, Empirical, FullRank, MeanField
from distvi.inference import Inference
from distvi.operators import KL, KSD
from distvi.stein import RBF, SHARD_KERNEL_ABOVE, as_kernel, check_shard_kernel_above


class KLqp(Inference):
    """Variational inference minimising KL(q || p) for any approximation of reparameterisable
    groups (mean-field, full-rank, or several groups together).

    Parameters
    ----------
    approx
        The :class:`~distvi.approximations.Approximation`.
    beta
        Weight of the KL part of the ELBO (``loss = -datalogp + beta (logq - varlogp)``).
    stl
        Sticking-the-landing gradient estimator.
    **kwargs
        Data keywords (``model``, ``data``, ``batch_size``, ``num_workers``, ``backend``,
        ``address``, ``random_seed``).
    """

    def __init__(self, approx: Approximation, beta: float = 1.0, stl: bool | None = None, **kwargs: Any) -> None:
        for g in approx.groups:
            if g.vfam == "empirical":
                raise TypeError("KLqp cannot fit an Empirical group: it has no density (fit "
                                "particles with SVGD)")
        super().__init__(KL, approx, beta=beta, stl=stl, **kwargs)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "beta": self.objective.beta, "stl": self.objective.stl_choice}


def _split(kwargs: dict) -> tuple[dict, dict]:
    family = {k: kwargs.pop(k) for k in ("start", "start_sigma") if k in kwargs}
    return family, kwargs


class ADVI(KLqp):
    """Automatic differentiation VI with a mean-field approximation.

    Examples
    --------
    >>> inference = ADVI(model=factory, data={"x": x}, random_seed=1)   # doctest: +SKIP
    >>> approx = inference.fit(5000)                                    # doctest: +SKIP
    """

    def __init__(self, *, beta: float = 1.0, stl: bool | None = None, **kwargs: Any) -> None:
        family, rest = _split(kwargs)
        super().__init__(MeanField(model=LATER, **family), beta=beta, stl=stl, **rest)


class FullRankADVI(KLqp):
    """ADVI with a full-rank (multivariate normal) approximation."""

    def __init__(self, *, beta: float = 1.0, stl: bool | None = None, **kwargs: Any) -> None:
        family, rest = _split(kwargs)
        super().__init__(FullRank(model=LATER, **family), beta=beta, stl=stl, **rest)


class ImplicitGradient(Inference):
    """Inference whose update direction is given by an operator rather than a loss's gradient.

    The base of :class:`SVGD` and :class:`ASVGD`: the workers return the summed, scaled data
    term's gradient at the points, the driver adds the prior's, and the Stein direction
    ``phi`` (see :mod:`distvi.stein`) moves the points, the particles themselves or, through
    the chain rule, the parameters of a parametric approximation.

    Parameters
    ----------
    approx
        An all-Empirical approximation (particles) or a reparameterisable one (mean-field,
        full-rank groups).
    estimator
        The operator (:class:`~distvi.operators.KSD`).
    kernel
        The kernel class or instance (default :class:`~distvi.stein.RBF`).
    shard_kernel_above
        The kernel work (n points, dimension D) goes to the workers, by slices of points,
        when ``n * n * D`` is at least this (default 3e8, measured); below it the driver
        does it.
        ``0`` always sends it, ``float("inf")`` never does. The numbers do not depend on it
        beyond rounding.
    **kwargs
        ``temperature`` (for KSD) and the data keywords of :class:`Inference`.
    """

    draws_adapt = False  # its draws a step are its particles (or obj_n_mc points): the user's

    def __init__(self, approx: Approximation, estimator: type = KSD, kernel: Any = RBF,
                 shard_kernel_above: float = SHARD_KERNEL_ABOVE, **kwargs: Any) -> None:
        if not (isinstance(estimator, type) and issubclass(estimator, KSD)):
            raise TypeError(f"estimator must be distvi.KSD (or a subclass), got {estimator!r}")
        as_kernel(kernel)
        check_shard_kernel_above(shard_kernel_above)
        kinds = {g.vfam == "empirical" for g in approx.groups}
        if len(kinds) > 1:
            raise TypeError("an approximation for Stein methods is either all Empirical groups "
                            "(particles) or none (draws from q); this one mixes them")
        super().__init__(estimator, approx, kernel=kernel, shard_kernel_above=shard_kernel_above,
                         **kwargs)

    # as in PyMC, KSD has no loss: ``hist`` is recorded only with ``fit(score=True)``, which
    # makes the workers compute the data term's value too (for a logistic likelihood that is
    # most of their work)
    _scores_by_default = False

    @property
    def kernel(self):
        return self.objective.stein.kernel

    @property
    def shard_kernel_above(self) -> float:
        return self.objective.stein.shard_kernel_above

    @property
    def kernel_sharded(self) -> bool | None:
        """Whether the last step's Stein direction was computed by the shard workers."""
        return self.objective.stein.sharded

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.objective.temperature,
                "shard_kernel_above": self.shard_kernel_above}

    def _points_per_step(self) -> int:
        if self.approx.all_histograms:
            return self.approx.joint_histogram.shape[0]
        return self._n_mc

    def _draws_per_step(self) -> int:
        return 0 if self.approx.all_histograms else self._n_mc

    def _cost_scale(self) -> float:
        return 1.0  # KSD has no loss to scale


class SVGD(ImplicitGradient):
    """Stein variational gradient descent: ``n_particles`` particles moved by the Stein direction.

    As PyMC's ``SVGD``, plus minibatches (the direction uses the workers' summed, scaled
    gradient) and a seeded start: the particles begin at ``start`` (default the model's
    initial point) plus normal noise of sd ``jitter`` drawn from ``random_seed``. The
    approximation is :func:`~distvi.approximations.Empirical` over the particles.

    KSD has no loss of its own: with ``fit(score=True)``, ``hist`` records the mean over
    particles of the negative log density (full-data units).
    """

    def __init__(self, n_particles: int = 100, jitter: float = 1, model: Any = None,
                 start: dict | None = None, random_seed: int | None = None, estimator: type = KSD,
                 kernel: Any = RBF, **kwargs: Any) -> None:
        if not _validate.is_int(n_particles):
            raise TypeError(f"n_particles must be an int, got {type(n_particles).__name__}")
        if n_particles < 2:
            raise ValueError(f"n_particles must be >= 2 (the kernel needs pairs), got {n_particles}")
        seed = check_seed(random_seed)
        approx = Empirical(size=int(n_particles), jitter=jitter, start=start, random_seed=seed,
                           model=LATER)
        super().__init__(approx, estimator=estimator, kernel=kernel, model=model,
                         random_seed=seed, **kwargs)
        self.n_particles, self.jitter = int(n_particles), float(jitter)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "n_particles": self.n_particles, "jitter": self.jitter}


class ASVGD(ImplicitGradient):
    """Amortized SVGD: a parametric approximation (default :func:`FullRank`) whose draws are
    moved along the Stein direction; ``fit`` draws ``obj_n_mc=500`` points per step.

    As in PyMC, the starting point belongs to the approximation: ``start`` is refused here
    (use ``approx=FullRank(start=...)``).
    """

    def __init__(self, approx: Approximation | None = None, estimator: type = KSD,
                 kernel: Any = RBF, **kwargs: Any) -> None:
        for key in ("start", "start_sigma"):
            if key in kwargs:
                raise TypeError(f"ASVGD() got an unexpected keyword argument {key!r}: give the "
                                f"approximation its start, e.g. approx=FullRank({key}=...)")
        import warnings

        warnings.warn(  # as PyMC's ASVGD, whose users' code may expect this warning
            "You are using experimental inference Operator (ASVGD): it needs a careful choice "
            "of temperature (default 1, which tends to underestimate the posterior variance; "
            "> 1 explores more) and many draws per step (obj_n_mc)", UserWarning, stacklevel=2)
        super().__init__(FullRank(model=LATER) if approx is None else approx, estimator=estimator,
                         kernel=kernel, **kwargs)

    def fit(self, n: int = 10000, score: bool | None = None, callbacks: Sequence[Callable] | None = None,
            progressbar: bool = True, *, obj_n_mc: int = 500, **kwargs: Any) -> Approximation:
        return super().fit(n, score, callbacks, progressbar, obj_n_mc=obj_n_mc, **kwargs)


METHODS: dict[str, type[Inference]] = {"advi": ADVI, "fullrank_advi": FullRankADVI,
                                       "svgd": SVGD, "asvgd": ASVGD}
