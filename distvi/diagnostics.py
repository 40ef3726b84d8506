"""Did it work? Pareto-smoothed importance sampling of q against the full-data posterior.

Yao, Vehtari, Simpson and Gelman (2018), "Yes, but did it work?: Evaluating variational
inference": draw S points from q, take the log importance ratios
``log p(z, all data) - log q(z)``, and fit a generalized Pareto distribution to the largest
ratios (ArviZ's PSIS). Its shape k̂ says how far q is from the posterior:

- k̂ <= 0.5: good; importance sampling with q converges quickly;
- 0.5 < k̂ <= 0.7: usable, the estimates are noisier;
- k̂ > 0.7: do not trust q; importance sampling cannot repair it.

Every diagnosis comes with advice (:func:`advise`): for a mean-field q far from the posterior,
the variables to put in one full-rank group — the pairs whose posterior correlation,
estimated from the PSIS-weighted draws of q, is largest.

The log-likelihood over *all* the rows is what the shard workers compute in parallel, each on
its own shard (no minibatch), so the diagnostic costs one pass over the data per ~4M
row-point pairs per worker; the prior term and log q are added on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distvi._validate import is_int

GOOD, USABLE = 0.5, 0.7
MIN_DRAWS = 100
CORRELATED = 0.3  # a weighted posterior correlation this large (in size) is worth a full-rank group
MOST_PAIRS = 3    # pairs named in the advice
MAX_CORRELATED_DIM = 2000  # above this many coordinates no correlations are estimated


def verdict(khat: float) -> str:
    """The paper's reading of k̂: ``"good"``, ``"usable"`` or ``"do not trust"``."""
    if not np.isfinite(khat) or khat > USABLE:
        return "do not trust"
    return "good" if khat <= GOOD else "usable"


@dataclass
class Diagnosis:
    """The PSIS diagnostic of an approximation.

    ``khat`` is the Pareto shape, ``ess`` the effective sample size of the smoothed weights
    (out of ``draws``), ``verdict`` the reading of ``khat``. ``points`` are the flat
    unconstrained draws from q, ``log_ratios`` their raw log importance ratios and
    ``log_weights`` the smoothed, normalized log weights. ``advice`` says what to do about
    ``khat``; ``correlated`` holds the ``(variable, variable, |correlation|)`` pairs it names
    (see :func:`correlated_pairs`), and ``gradient_evaluations`` what the fit that made q
    used (``approx.fit_info``; None before a fit).
    """

    khat: float
    ess: float
    draws: int
    verdict: str
    points: np.ndarray = field(repr=False)
    log_ratios: np.ndarray = field(repr=False)
    log_weights: np.ndarray = field(repr=False)
    advice: str = ""
    gradient_evaluations: int | None = None  # what the fit that made q used (fit_info)
    correlated: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.log_weights)

    def as_dict(self) -> dict[str, Any]:
        return {"khat": self.khat, "ess": self.ess, "draws": self.draws, "verdict": self.verdict,
                "advice": self.advice, "gradient_evaluations": self.gradient_evaluations,
                "correlated": [list(c) for c in self.correlated]}

    def __str__(self) -> str:
        used = ("" if self.gradient_evaluations is None else
                f"; the fit used {self.gradient_evaluations} gradient evaluations")
        return (f"PSIS k-hat {self.khat:.3f} ({self.verdict}); ESS of the weights "
                f"{self.ess:.0f} of {self.draws} draws{used}\nadvice: {self.advice}")


def check_draws(draws: Any) -> int:
    if not is_int(draws):
        raise TypeError(f"draws must be an int, got {type(draws).__name__}")
    if draws < MIN_DRAWS:
        raise ValueError(f"draws must be >= {MIN_DRAWS} for a Pareto fit to the tail, got {draws}")
    return int(draws)


def log_importance_ratios(approx, points: np.ndarray) -> np.ndarray:
    """``log p(z, all data) - log q(z)`` at flat unconstrained points (S, D): the data term on
    the shard workers of the approximation's Inference, the prior term and log q here."""
    shard_data = approx.shard_data
    if shard_data is None:
        raise RuntimeError("the approximation has no data attached: fit it with distvi first")
    adapter = approx.adapter
    points = np.ascontiguousarray(points, dtype="float64")
    data = shard_data.logp(points)
    prior, _ = adapter.compile_prior_term(points.shape[0])(points)
    return data + prior - approx.logq_at(points)


def diagnose(approx, draws: int = 1000, random_seed: Any = None) -> Diagnosis:
    """PSIS k̂ of ``approx`` against the full-data posterior, from ``draws`` draws of q.

    Written to the run store and the MLflow run of the fit that made ``approx``, when it had
    them. ``random_seed`` fixes the draws (default: fresh entropy).
    """
    import arviz as az

    from distvi._rng import check_seed

    draws = check_draws(draws)
    seed = check_seed(random_seed)
    if approx.require_bound().locals:
        raise ValueError("PSIS with local variables would need the joint density of every "
                         "group's draws at each draw of the globals, which the workers do not "
                         "compute yet: diagnose() is not available for a fit with local=")
    if any(g.vfam == "empirical" for g in approx.groups):
        raise TypeError("PSIS needs the density of q: an Empirical approximation (draws or "
                        "SVGD particles) has none")
    points = approx.draw_flat(draws, np.random.default_rng(seed))
    ratios = log_importance_ratios(approx, points)
    if np.isnan(ratios).any() or np.isposinf(ratios).any():
        bad = int(np.sum(~np.isfinite(ratios) & ~np.isneginf(ratios)))
        raise FloatingPointError(f"{bad} of {draws} log importance ratios are NaN or +inf: the "
                                 "model's log density is not finite where q puts mass")
    if np.isneginf(ratios).all():
        raise FloatingPointError("every draw of q has zero posterior density")
    smoothed, khat = az.psislw(ratios, normalize=True)
    khat = float(np.asarray(khat))
    weights = np.exp(smoothed)
    ess = float(1.0 / np.sum(weights**2))
    correlated = correlated_pairs(approx, points, weights)
    info = getattr(approx, "fit_info", None) or {}
    result = Diagnosis(khat, ess, draws, verdict(khat), points, ratios, np.asarray(smoothed),
                       advise(approx, khat, correlated, info), info.get("gradient_evaluations"),
                       correlated or [])
    approx.shard_data.record_diagnosis(result)
    return result


def weighted_correlation(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The correlation matrix of ``points`` (S, D) under normalized ``weights`` (S,)."""
    w = weights / weights.sum()
    centred = points - w @ points
    cov = centred.T @ (centred * w[:, None])
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    return np.where(np.isfinite(corr), corr, 0.0)


def correlated_pairs(approx, points: np.ndarray, weights: np.ndarray,
                     most: int = MOST_PAIRS) -> list[tuple[str, str, float]] | None:
    """The pairs of variables (by name) whose PSIS-weighted posterior correlation is largest
    in size, at least :data:`CORRELATED`, strongest first: for a vector variable its largest
    between any of their elements, and a variable paired with itself when its own elements
    are correlated. Pairs that one full-rank group already holds are left out. None above
    :data:`MAX_CORRELATED_DIM` coordinates."""
    if points.shape[1] > MAX_CORRELATED_DIM:
        return None
    corr = np.abs(weighted_correlation(points, weights))
    layout = approx.adapter.layout
    together = {}  # variable -> its full-rank group's index
    for k, group in enumerate(approx.groups):
        if group.vfam == "full_rank":
            together.update({lay.name: k for lay in group.layout})
    pairs = []
    for i, a in enumerate(layout):
        for b in layout[i:]:
            if a.name in together and together.get(b.name) == together[a.name]:
                continue
            block = corr[a.start:a.stop, b.start:b.stop]
            if a is b:
                block = block[~np.eye(a.size, dtype=bool)] if a.size > 1 else np.zeros(0)
            r = float(np.max(block, initial=0.0))
            if r >= CORRELATED:
                pairs.append((a.rv_name, b.rv_name, r))
    pairs.sort(key=lambda p: -p[2])
    return pairs[:most]


def advise(approx, khat: float, correlated: list[tuple[str, str, float]] | None,
           fit_info: dict) -> str:
    """What to do about a k̂ (see the module's docstring)."""
    mean_field = any(g.vfam == "mean_field" for g in approx.groups)
    if np.isfinite(khat) and khat <= GOOD:
        return "no action needed"
    if np.isfinite(khat) and khat <= USABLE:
        richer = "FullRankADVI, " if mean_field else ""
        return ("usable, but estimates from q are noisy: " + richer + "more steps or n=None "
                "(fit until converged) may bring k-hat under 0.5")
    if mean_field:
        if correlated is None:
            return (f"do not trust q: try FullRankADVI, or full-rank groups of the variables "
                    f"you expect to be correlated (over {MAX_CORRELATED_DIM} coordinates: no "
                    f"correlations were estimated)")
        if not correlated:
            return ("do not trust q: try FullRankADVI (no strong posterior correlation shows in "
                    "the weighted draws: the posterior may be skewed or heavy-tailed; a "
                    "reparameterisation may be needed)")
        names = sorted({n for a, b, _ in correlated for n in (a, b)})
        which = "; ".join(f"{a} and {b}: {r:.2f}" if a != b else f"{a}'s elements: {r:.2f}"
                          for a, b, r in correlated)
        return (f"do not trust q: try FullRankADVI, or put the most correlated variables in one "
                f"full-rank group, Group({names!r}, vfam='full_rank'), the rest in Group(None, "
                f"vfam='mean_field') (weighted posterior correlations, in size: {which})")
    if fit_info.get("converged"):
        return ("do not trust q: the full-rank fit converged, so the posterior is far from "
                "Gaussian in the unconstrained space: reparameterise the model, or use SVGD")
    return ("do not trust q: fit the full-rank approximation longer, with more steps or n=None "
            "(until converged); if k-hat stays above 0.7, the posterior is far from Gaussian")


def resample(draws: int, diagnosis: Diagnosis, random_seed: Any = None) -> np.ndarray:
    """Indices of ``draws`` importance-resampled points of ``diagnosis`` (with replacement,
    by their smoothed weights); refuses when k̂ > 0.7."""
    if diagnosis.khat > USABLE or not np.isfinite(diagnosis.khat):
        raise ValueError(
            f"PSIS k-hat is {diagnosis.khat:.2f} (> {USABLE}): q is too far from the posterior "
            "for importance resampling to correct it; fit a richer approximation (e.g. "
            "FullRankADVI) or fit longer, or sample without psis=True")
    rng = np.random.default_rng(random_seed)
    w = diagnosis.weights
    return rng.choice(w.size, size=draws, replace=True, p=w / w.sum())
