"""What a fit run until convergence measures of q: per-coordinate rate scales, moments and
their Monte Carlo errors, the change between phases, and the full-data loss (see
:mod:`distvi.convergence`)."""

from __future__ import annotations

import numpy as np


def step_scales(approx, params) -> tuple[np.ndarray, ...]:
    """Per parameter of ``approx`` at the values ``params``, each coordinate's scale in q."""
    out = []
    values = list(params)
    i = 0
    for group in approx.groups:
        p = {k: np.asarray(values[i + j]) for j, k in enumerate(group.family.param_names)}
        i += len(group.family.param_names)
        if group.vfam == "mean_field":
            sd = group.family.evaluate("std", p)
            out += [sd, np.ones_like(p["rho"])]
        elif group.vfam == "full_rank":
            cov = group.family.evaluate("cov", p)
            d = cov.shape[0]
            try:
                cond = 1.0 / np.sqrt(np.diag(np.linalg.inv(cov)))
            except np.linalg.LinAlgError:
                cond = np.sqrt(np.diag(cov))
            rows, cols = np.tril_indices(d)
            # a row's entries move together: each by its share of the row's scale
            tril = np.where(rows == cols, 1.0, cond[rows] / np.sqrt(rows + 1.0))
            out += [cond, tril]
        else:  # particles: their spread per coordinate
            h = p["histogram"]
            sd = h.std(axis=0) if h.shape[0] > 1 else np.ones(h.shape[1])
            sd = np.where(sd > 0, sd, 1.0)
            out += [np.broadcast_to(sd, h.shape).copy()]
    return tuple(np.where(np.isfinite(s) & (s > 0), s, 1.0).astype("float64") for s in out)


def whitening(approx, params) -> dict[int, np.ndarray]:
    """Per full-rank group, its mean's position among ``params`` and q's Cholesky factor
    there: the mean then steps along q's own whitened directions (on a posterior with
    strongly correlated coordinates a per-coordinate scale moves along the ridge by the
    small conditional sds only, and the phases crawl)."""
    out, i = {}, 0
    for group in approx.groups:
        names = group.family.param_names
        if group.vfam == "full_rank":
            p = {k: np.asarray(params[i + j]) for j, k in enumerate(names)}
            L = group.family.evaluate("L", p)  # the family's own factor: no decomposition
            if np.all(np.isfinite(L)):
                out[i + names.index("mu")] = L
        i += len(names)
    return out


LOSS_DRAWS = 16  # draws of the full-data loss at a phase's average


def full_loss(inference, params, phase: int) -> tuple[float, float]:
    """The full-data loss (negative ELBO: minus the expected log density, on the fit's
    workers, over :data:`LOSS_DRAWS` draws of q seeded by the run and phase, minus q's exact
    entropy) at ``params`` and its Monte Carlo standard error; NaN for particles (no
    entropy). The entropy is exact, not log q at the draws, which a nearly singular q turns
    to rounding noise."""
    from distvi._rng import PATHFINDER_STREAM

    approx = inference.approx
    if any(g.vfam == "empirical" for g in approx.groups):
        return float("nan"), float("nan")
    saved = approx.params_values
    approx.params_values = params
    try:
        rng = np.random.default_rng([inference.random_seed, PATHFINDER_STREAM, phase])
        points = approx.draw_flat(LOSS_DRAWS, rng)
        with np.errstate(all="ignore"):
            data, prior = approx._data_and_prior(points)
            entropy = sum(float(g.family.evaluate("entropy", dict(g.params))) for g in approx.groups)
            values = -data - prior
    finally:
        approx.params_values = saved
    if not (np.all(np.isfinite(values)) and np.isfinite(entropy)):
        return float("inf"), float("inf")
    return float(np.mean(values) - entropy), float(np.std(values, ddof=1) / np.sqrt(LOSS_DRAWS))


def far_above(level, reference) -> bool:
    """A full-data loss far above the lowest seen, by 1 % of it and ten of its standard
    errors (a phase's average is never worse than its start but by noise; a runaway q's
    own estimate is too noisy to be a yardstick), or a million times its size either way
    (arithmetic of parameters that ran away)."""
    (now, _), (best, best_se) = level, reference
    if np.isnan(now) or np.isnan(best):  # particles: no loss to compare
        return False
    if abs(now) > 1e6 * max(abs(best), 1.0):
        return True  # a million times the size of any loss seen, either way: a runaway
    return now - best > max(10 * best_se, 0.01 * abs(best), 1e-9)


def moments(approx, params) -> tuple[np.ndarray, np.ndarray]:
    """q's flat means and standard deviations at the parameter values ``params``."""
    saved = approx.params_values
    approx.params_values = params
    try:
        return np.asarray(approx.mean, dtype="float64"), np.asarray(approx.std, dtype="float64")
    finally:
        approx.params_values = saved


NOISE_PARTS = 8  # parts of a phase's last half whose spread gives its average's error


def phase_moments(approx, watch, shapes, average) -> tuple[np.ndarray, ...]:
    """q's means and sds at a phase's ``average``, and their Monte Carlo standard errors
    from the spread of :data:`NOISE_PARTS` consecutive parts of the averaged half."""
    m, sd = moments(approx, average)
    parts = [moments(approx, p) for p in watch.average(shapes, NOISE_PARTS)]
    k = len(parts)
    se_m = np.std([p[0] for p in parts], axis=0, ddof=1) / np.sqrt(k)
    se_s = np.std([p[1] for p in parts], axis=0, ddof=1) / np.sqrt(k)
    return m, sd, se_m, se_s


def change(before, after) -> tuple[float, float, float]:
    """Between two phases: the largest change of a mean (in sds) or an sd (relative); the
    largest such change less twice its Monte Carlo error; and the largest error."""
    (m0, s0, em0, es0), (m1, s1, em1, es1) = before, after
    d = np.concatenate([np.abs(m1 - m0) / s1, np.abs(s1 - s0) / s1])
    se = np.concatenate([np.hypot(em0, em1) / s1, np.hypot(es0, es1) / s1])
    if d.size == 0:
        return 0.0, 0.0, 0.0
    return float(d.max()), float(np.max(np.maximum(d - 2 * se, 0.0))), float(se.max())
