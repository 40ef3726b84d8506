"""A start near the answer: L-BFGS on the full-data log density, and the best Gaussian along
its path (the idea of Pathfinder: Zhang, Carpenter, Gelman and Vehtari, JMLR 2022).

The log density is the model's over all its rows, in the unconstrained space: the shard
workers sum the log-likelihood and its gradient over their whole shards, the driver adds the
prior term. Along the optimisation path, each iterate's curvature pairs ``(s, y)`` give a
quasi-Newton inverse Hessian ``H``, and so a Gaussian ``N(x - H g, H)`` (``g`` the gradient
of the negative log density there). Each family of the approximation takes that Gaussian
in its own form — full-rank groups its covariance block, mean-field groups the precision's
diagonal (a mean-field q's optimum for a Gaussian target), particles draws from it — and the
iterate whose q has the best ELBO estimate becomes the start. When L-BFGS cannot make
progress the approximation keeps its own start, and a :class:`~distvi.errors.StartWarning`
says why.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from distvi._rng import PATHFINDER_STREAM, Stream
from distvi.errors import StartWarning
from distvi.families import softplus_inv

HISTORY = 20      # curvature pairs per quasi-Newton Gaussian
MAX_ITER = 1000   # L-BFGS iterations at most
CANDIDATES = 30   # iterates whose Gaussian gets an ELBO estimate (spread along the path)
ELBO_DRAWS = 8    # draws per ELBO estimate
DENSE_MAX = 2000  # above this dimension a Gaussian is kept by its diagonal only
LAPLACE_MAX = 200  # up to this dimension the Laplace Gaussian at the MAP is a candidate too


@dataclass
class StartReport:
    """How a fit's start was found.

    ``method`` is ``"map"`` (the Pathfinder Gaussian) or ``"default"`` (the approximation's
    own start, after a failed search: ``message`` says why); ``gradient_evaluations`` counts
    full-data log density and gradient evaluations (L-BFGS), ``density_evaluations``
    full-data log densities at draws (the ELBO estimates).
    """

    method: str
    message: str
    iterations: int
    gradient_evaluations: int
    density_evaluations: int
    chosen_iterate: int
    elbo: float
    map_logp: float
    seconds: float
    laplace: bool = False  # the start is the Laplace Gaussian at the MAP (finite differences)

    def as_dict(self) -> dict:
        return asdict(self)


class _Objective:
    """``-log p`` over all the data and its gradient at one flat point, with every evaluation
    kept (the path's gradients are read back from it)."""

    def __init__(self, approx) -> None:
        self.approx, self.adapter = approx, approx.adapter
        self.seen: dict[bytes, tuple[float, np.ndarray]] = {}
        self.evaluations = 0

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        key = x.tobytes()
        if key not in self.seen:
            pts = x[None, :]
            data, dgrad = self.approx.shard_data.logp_and_grad(pts)
            prior, pgrad = self.adapter.compile_prior_term(1)(pts)
            self.evaluations += 1
            f, g = -float(data[0] + prior[0]), -(dgrad[0] + pgrad[0])
            if not (np.isfinite(f) and np.all(np.isfinite(g))):
                f, g = np.inf, np.zeros_like(x)  # a failed trial point: the line search backs off
            self.seen[key] = (f, g)
        f, g = self.seen[key]
        return f, g.copy()

    def log_density(self, points: np.ndarray) -> np.ndarray:
        """``log p`` at many points (no gradient)."""
        data = self.approx.shard_data.logp(points)
        return data + self.adapter.compile_prior_term(points.shape[0])(points)[0]


def lbfgs_path(objective, x0: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list[float], str]:
    """The iterates of L-BFGS on ``objective`` from ``x0``, their gradients and values, and
    the optimiser's message."""
    from scipy.optimize import minimize

    f0, g0 = objective(x0)
    xs, gs, fs = [x0.copy()], [g0], [f0]
    if not np.isfinite(f0):
        return xs, gs, fs, "the log density or its gradient is not finite at the initial point"

    def keep(intermediate_result):
        x = np.array(intermediate_result.x, dtype="float64")
        f, g = objective(x)
        xs.append(x)
        gs.append(g)
        fs.append(f)

    res = minimize(objective, x0, jac=True, method="L-BFGS-B", callback=keep,
                   options={"maxiter": MAX_ITER, "maxcor": HISTORY})
    return xs, gs, fs, str(res.message)


def _pairs(xs, gs, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The last :data:`HISTORY` curvature pairs up to iterate ``k`` with ``s'y > 0``."""
    out = []
    for i in range(k, 0, -1):
        s, y = xs[i] - xs[i - 1], gs[i] - gs[i - 1]
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y) and sy > 0:
            out.append((s, y))
            if len(out) == HISTORY:
                break
    return out[::-1]  # oldest first


def _dense_inverse_hessian(pairs, d: int) -> np.ndarray:
    """The BFGS inverse Hessian from ``pairs`` (oldest first), started at the newest pair's
    scale ``s'y / y'y``."""
    s, y = pairs[-1]
    H = np.eye(d) * (float(s @ y) / float(y @ y))
    for s, y in pairs:
        rho = 1.0 / float(y @ s)
        Hy = H @ y
        H = H - rho * (np.outer(s, Hy) + np.outer(Hy, s)) + (rho * rho * float(y @ Hy) + rho) * np.outer(s, s)
    return 0.5 * (H + H.T)


def _hessian_diagonal(pairs, d: int) -> np.ndarray:
    """The diagonal of the L-BFGS Hessian ``B`` from ``pairs``, in the compact form
    ``B = δI - U N^{-1} U'`` with ``U = [δS, Y]`` (O(d m²), no d x d matrix)."""
    S = np.stack([p[0] for p in pairs], axis=1)
    Y = np.stack([p[1] for p in pairs], axis=1)
    s, y = pairs[-1]
    delta = float(y @ y) / float(s @ y)
    SY = S.T @ Y
    Lo = np.tril(SY, -1)
    N = np.block([[delta * (S.T @ S), Lo], [Lo.T, -np.diag(np.diag(SY))]])
    U = np.concatenate([delta * S, Y], axis=1)
    return delta - np.einsum("ij,ij->i", U, np.linalg.solve(N, U.T).T)


def _two_loop(pairs, g: np.ndarray) -> np.ndarray:
    """``H g`` for the L-BFGS inverse Hessian of ``pairs`` (oldest first)."""
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        a = float(s @ q) / float(y @ s)
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    r = q * (float(s @ y) / float(y @ y))
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = float(y @ r) / float(y @ s)
        r += s * (a - b)
    return r


def _hessian_at(objective, x: np.ndarray, pairs) -> np.ndarray:
    """The Hessian of ``objective`` at ``x`` by central differences of its gradient, each
    coordinate stepped by a thousandth of its quasi-Newton sd (2 d gradient evaluations)."""
    d = x.shape[0]
    h = 1e-3 * np.sqrt(np.abs(np.diag(_dense_inverse_hessian(pairs, d))))
    cols = []
    for j in range(d):
        e = np.zeros(d)
        e[j] = h[j]
        cols.append((objective(x + e)[1] - objective(x - e)[1]) / (2 * h[j]))
    B = np.array(cols)
    B = 0.5 * (B + B.T)
    np.linalg.cholesky(B)  # not positive definite: LinAlgError, the candidate is dropped
    return B


class _Gaussian:
    """The start a path iterate gives each group: per group a mean and a dense covariance
    (full-rank, particles) or standard deviations (mean-field)."""

    def __init__(self, approx, x: np.ndarray, g: np.ndarray, pairs=None, hessian=None) -> None:
        """From the curvature ``pairs`` at ``x``, or from a dense ``hessian`` there."""
        d = x.shape[0]
        dense = d <= DENSE_MAX
        if hessian is not None:
            H = np.linalg.inv(hessian)
            diag_b = np.diag(hessian)
        else:
            H = _dense_inverse_hessian(pairs, d) if dense else None
            diag_b = _hessian_diagonal(pairs, d)
        self.mean = x - (H @ g if dense else _two_loop(pairs, g))
        self.blocks = []  # (indices, "dense" cov | "diag" sd)
        for group in approx.groups:
            idx = group.indices
            if group.vfam == "mean_field" or not dense:
                if np.any(~(diag_b[idx] > 0)):
                    raise np.linalg.LinAlgError("the Hessian's diagonal is not positive")
                self.blocks.append((idx, "diag", 1.0 / np.sqrt(diag_b[idx])))
            else:
                cov = H[np.ix_(idx, idx)]
                self.blocks.append((idx, "dense", np.linalg.cholesky(cov)))

    def draw_and_logq(self, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.empty_like(eps)
        logq = np.zeros(eps.shape[0])
        for idx, kind, factor in self.blocks:
            e = eps[:, idx]
            if kind == "diag":
                z[:, idx] = self.mean[idx] + e * factor
                logdet = np.sum(np.log(factor))
            else:
                z[:, idx] = self.mean[idx] + e @ factor.T
                logdet = np.sum(np.log(np.diag(factor)))
            logq += -0.5 * np.sum(e**2, axis=1) - logdet - 0.5 * len(idx) * np.log(2 * np.pi)
        return z, logq

    def set_params(self, approx, eps_particles: np.ndarray) -> None:
        """The groups' parameters from this Gaussian (particles: draws of it)."""
        for group, (idx, kind, factor) in zip(approx.groups, self.blocks):
            mean = self.mean[idx]
            if group.vfam == "empirical":
                n = np.shape(group.params["histogram"])[0]
                e = eps_particles[:n, idx]
                group.params = {"histogram": mean + (e * factor if kind == "diag" else e @ factor.T)}
            elif group.vfam == "mean_field":
                group.params = group.family.init(mean, factor)
            else:
                Lc = np.diag(factor) if kind == "diag" else factor
                packed = Lc[np.tril_indices(len(idx))].copy()
                diag = group.family.diag_positions(len(idx))
                packed[diag] = softplus_inv(np.diag(Lc))
                group.params = {"mu": mean.copy(), "L_tril": packed}


def map_start(approx, random_seed: int) -> StartReport:
    """Set ``approx``'s parameters to the best Pathfinder Gaussian of an L-BFGS path from its
    current mean (or leave them, with a :class:`~distvi.errors.StartWarning`) and say how."""
    t0 = time.perf_counter()
    objective = _Objective(approx)
    x0 = np.asarray(approx.mean, dtype="float64").copy() if approx.ndim else np.zeros(0)
    report = StartReport("default", "", 0, 0, 0, 0, float("nan"), float("nan"), 0.0)
    if approx.ndim == 0:
        report.message = "the model has no free variables"
        return report
    xs, gs, fs, message = lbfgs_path(objective, x0)
    report.iterations, report.map_logp = len(xs) - 1, -float(min(fs))
    stream = Stream(random_seed, PATHFINDER_STREAM)
    k_all = [k for k in range(1, len(xs)) if np.isfinite(fs[k])]
    picks = sorted(set(int(round(v)) for v in np.linspace(0, len(k_all) - 1, CANDIDATES))) if k_all else []
    best = laplace = None
    # the same normals for every candidate: their ELBO estimates differ by the Gaussians
    # alone, not by draws
    eps = stream.normal((ELBO_DRAWS, approx.ndim), 0)
    position = eps.size
    candidates = [(k, None) for k in (k_all[j] for j in picks)]
    k_map = int(np.argmin(fs))
    if k_map > 0 and approx.ndim <= LAPLACE_MAX:  # the Laplace Gaussian at the MAP competes too
        candidates.append((k_map, "laplace"))
    for k, kind in candidates:
        pairs = _pairs(xs, gs, k)
        if not pairs:
            continue
        try:
            hessian = _hessian_at(objective, xs[k], pairs) if kind == "laplace" else None
            q = _Gaussian(approx, xs[k], gs[k], pairs=pairs, hessian=hessian)
        except np.linalg.LinAlgError:
            continue
        z, logq = q.draw_and_logq(eps)
        logp = objective.log_density(z)
        report.density_evaluations += ELBO_DRAWS
        with np.errstate(invalid="ignore"):
            values = logp - logq
        elbo = float(np.mean(values))
        if not np.isfinite(elbo):
            continue
        if kind == "laplace":
            laplace = (elbo, k, q, values)
        if best is None or elbo > best[0]:
            best = (elbo, k, q, values)
    if laplace is not None and best is not laplace:
        # a few draws cannot tell Gaussians apart by a small KL: the Laplace Gaussian at the
        # MAP stands unless the other is better by two standard errors of the difference
        diff = best[3] - laplace[3]
        if np.mean(diff) < 2 * np.std(diff, ddof=1) / np.sqrt(len(diff)):
            best = laplace
    report.gradient_evaluations = objective.evaluations
    report.seconds = time.perf_counter() - t0
    if best is None:
        why = (message if not np.isfinite(fs[0]) else
               f"L-BFGS made no progress ({message})" if len(xs) < 2 else
               "no iterate of the L-BFGS path gave a Gaussian with a finite ELBO")
        report.message = why
        warnings.warn(f"start='map' failed: {why}; the fit starts from the approximation's "
                      "own start instead", StartWarning, stacklevel=3)
        return report
    report.elbo, report.chosen_iterate, q = best[:3]
    report.laplace = best is laplace
    n_part = max((np.shape(g.params["histogram"])[0] for g in approx.groups
                  if g.vfam == "empirical"), default=0)
    q.set_params(approx, stream.normal((n_part, approx.ndim), position) if n_part else None)
    report.method, report.message = "map", message
    report.seconds = time.perf_counter() - t0
    return report


def start_near_answer(inference, store, resume) -> StartReport | None:
    """``start="map"`` for ``inference``'s fit, when asked for (a group's ``start``) or by
    default (a first fit with ``n=None`` of groups with no start of their own); None when
    the fit keeps its start (it continues a fit, or resumes a run store)."""
    from distvi.store import RunStore

    groups = inference.approx.groups
    asked = any(isinstance(g.start, str) for g in groups)
    default = inference._until is not None and not any(g.has_own_start for g in groups)
    if inference.state is not None or not (asked or default) or (
            resume and store is not None and RunStore.exists(store)):
        return None
    inference.shards.start()
    return map_start(inference.approx, inference.random_seed)
