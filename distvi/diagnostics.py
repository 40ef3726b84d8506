"""Did it work? Pareto-smoothed importance sampling of q against the full-data posterior.

Yao, Vehtari, Simpson and Gelman (2018), "Yes, but did it work?: Evaluating variational
inference": draw S points from q, take the log importance ratios
``log p(z, all data) - log q(z)``, and fit a generalized Pareto distribution to the largest
ratios (ArviZ's PSIS). Its shape k̂ says how far q is from the posterior:

- k̂ <= 0.5: good; importance sampling with q converges quickly;
- 0.5 < k̂ <= 0.7: usable, the estimates are noisier;
- k̂ > 0.7: do not trust q; importance sampling cannot repair it.

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
    ``log_weights`` the smoothed, normalized log weights.
    """

    khat: float
    ess: float
    draws: int
    verdict: str
    points: np.ndarray = field(repr=False)
    log_ratios: np.ndarray = field(repr=False)
    log_weights: np.ndarray = field(repr=False)

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.log_weights)

    def as_dict(self) -> dict[str, Any]:
        return {"khat": self.khat, "ess": self.ess, "draws": self.draws, "verdict": self.verdict}

    def __str__(self) -> str:
        return (f"PSIS k-hat {self.khat:.3f} ({self.verdict}); ESS of the weights "
                f"{self.ess:.0f} of {self.draws} draws")


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
    approx.require_bound()
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
    result = Diagnosis(khat, ess, draws, verdict(khat), points, ratios, np.asarray(smoothed))
    approx.shard_data.record_diagnosis(result)
    return result


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
