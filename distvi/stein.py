"""Stein variational gradient: the RBF kernel, the update direction, and :class:`Stein`.

For particles ``x_1..x_n`` with log-density gradients ``g_j`` (prior plus the workers' summed,
scaled data term), the Stein update direction at particle ``i`` is

    phi_i = (1/n) sum_j [ k(x_j, x_i) g_j / T + grad_{x_j} k(x_j, x_i) ]

with the RBF kernel ``k(x, y) = exp(-||x - y||^2 / (2h))``. The bandwidth ``h`` follows
PyMC's median heuristic: ``h = med / (2 log(n + 1))`` where ``med`` is the median of all
``n^2`` squared distances (diagonal included). ``phi`` is computed by rows, so a slice of
particles can be handed to each shard worker: the cost is O(n^2 D) and only the rows' share of
it lands on each worker. This module is plain numpy; the driver and the workers call the
same functions, so the sharded and the driver-only directions agree to rounding.
"""

from __future__ import annotations

import math

import numpy as np

from distvi._validate import is_real

TINY = float(np.finfo("float64").tiny)
# squared distances each worker samples for the bracket around the median
SAMPLE_PER_WORKER = 2**16


def particle_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous, near-equal slices of ``n`` particle rows."""
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ------------------------------------------------------------------ the exact median by slices
# With the particles split into row slices across workers, the median of all n^2 squared
# distances is found without moving them: each worker samples its slice's distances, the
# driver brackets the median from the pooled sample, each worker returns how many of its
# distances fall below the bracket and those inside it, and the driver selects the exact
# median from those (a bracket that missed, which the counts reveal, is widened to all values).

def sample_stride(n_values: int, n_cols: int) -> int:
    """A stride for sampling a slice's flattened distances, coprime with the row length so
    the sample walks across columns."""
    stride = max(1, n_values // SAMPLE_PER_WORKER)
    while stride > 1 and math.gcd(stride, n_cols) != 1:
        stride += 1
    return stride


def median_ranks(n_values: int) -> tuple[int, int]:
    """0-based ranks whose mean is the median (equal when ``n_values`` is odd)."""
    return (n_values - 1) // 2, n_values // 2


def median_bracket(samples: list[np.ndarray], n_values: int) -> tuple[float, float]:
    """An interval that holds the median of ``n_values`` values with near certainty, from
    samples of them (the caller checks, by counts, that it did)."""
    pooled = np.sort(np.concatenate(samples))
    m = pooled.size
    r1, r2 = median_ranks(n_values)
    margin = 5.0 * math.sqrt(m) + 2
    i = math.floor(r1 / n_values * m - margin)
    j = math.ceil(r2 / n_values * m + margin)
    return (pooled[i] if i > 0 else -np.inf), (pooled[j] if j < m - 1 else np.inf)


def count_and_values(H: np.ndarray, a: float, b: float) -> tuple[int, np.ndarray]:
    """How many of ``H`` are below ``a``, and those in ``[a, b]``."""
    return int(np.count_nonzero(H < a)), H[(H >= a) & (H <= b)]


def median_from(parts: list[tuple[int, np.ndarray]], n_values: int) -> float | None:
    """The exact median from every slice's (count below, values inside) of one bracket, or
    None when the bracket missed it."""
    below = sum(c for c, _ in parts)
    inside = np.concatenate([v for _, v in parts])
    r1, r2 = median_ranks(n_values)
    if not (below <= r1 and below + inside.size > r2):
        return None
    k1, k2 = r1 - below, r2 - below
    vals = np.partition(inside, [k1, k2] if k1 != k2 else k1)
    return 0.5 * (float(vals[k1]) + float(vals[k2]))


class RBF:
    """The radial basis function kernel with PyMC's median-heuristic bandwidth.

    ``RBF()(X)`` returns ``(Kxy, dxkxy)`` as PyMC's ``rbf`` does: the n x n kernel matrix and,
    per row, ``sum_j grad_{x_j} k(x_j, x_i)``.
    """

    @staticmethod
    def sq_dists(X: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Squared distances from rows ``lo:hi`` of ``X`` to every row: (hi - lo, n)."""
        x2 = np.einsum("ij,ij->i", X, X)
        return x2[lo:hi, None] + x2[None, :] - 2.0 * (X[lo:hi] @ X.T)

    def bandwidth(self, X: np.ndarray, H: np.ndarray | None = None) -> float:
        """``h = median(squared distances) / (2 log(n + 1))``, recomputed at every step.

        ``H`` is ``sq_dists(X)`` when already computed. All particles equal gives ``h`` = the
        smallest positive double (no NaN: the kernel is then 1 between equal particles and
        0 otherwise).
        """
        flat = (self.sq_dists(X) if H is None else H).ravel()
        mid = flat.size // 2
        part = np.partition(flat, mid)
        med = part[mid] if flat.size % 2 else 0.5 * (part[:mid].max() + part[mid])
        return self.bandwidth_from_median(float(med), X.shape[0])

    @staticmethod
    def bandwidth_from_median(med: float, n: int) -> float:
        return max(0.5 * med / np.log(n + 1.0), TINY)

    def phi_rows(self, X: np.ndarray, G: np.ndarray, h: float, temperature: float,
                 lo: int = 0, hi: int | None = None, H: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi`` of the Stein direction for particles ``X`` with gradients ``G``
        (``H``: their rows of ``sq_dists(X)`` when already computed)."""
        n, d = X.shape
        K = np.exp((self.sq_dists(X, lo, hi) if H is None else H) * (-0.5 / h))
        KGX = K @ np.concatenate([G, X], axis=1)  # one product for both parts
        density = KGX[:, :d]
        repulsive = (X[lo:hi] * K.sum(axis=1)[:, None] - KGX[:, d:]) / h
        return (density / temperature + repulsive) / n

    def __call__(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype="float64")
        h = self.bandwidth(X)
        K = np.exp(self.sq_dists(X) * (-0.5 / h))
        dxkxy = (X * K.sum(axis=1)[:, None] - K @ X) / h
        return K, dxkxy

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return "RBF()"


rbf = RBF()


def as_kernel(kernel) -> RBF:
    """A kernel instance from a kernel class or instance."""
    if isinstance(kernel, type):
        kernel = kernel()
    needs = ("sq_dists", "bandwidth", "bandwidth_from_median", "phi_rows")
    if not all(callable(getattr(kernel, m, None)) for m in needs):
        raise TypeError(f"kernel must provide sq_dists, bandwidth and phi_rows (as distvi.RBF "
                        f"does); got {kernel!r}")
    return kernel


def check_temperature(temperature) -> float:
    if not is_real(temperature):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


# n^2 D of the kernel work from which the shard workers compute phi by slices of particles.
# Measured on the 2-core development machine (benchmarks/bench_svgd.py, 2 workers): at
# n^2 D = 1e8 the driver takes 32 ms against the workers' 63 ms; at 4.2e8, 187 ms against 150.
SHARD_KERNEL_ABOVE = 3e8


def check_shard_kernel_above(value) -> float:
    if not is_real(value):
        raise TypeError(f"shard_kernel_above must be a number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"shard_kernel_above must be >= 0, got {value}")
    return float(value)


class SteinDirection:
    """``phi`` at points with log-density gradients ``grads``: on the driver, or by slices of
    points on the shard workers when the kernel work ``n * n * D`` is at least
    ``shard_kernel_above`` (the driver then only brackets and selects the bandwidth's median).

    ``sharded`` says where the last direction was computed.
    """

    def __init__(self, kernel, shard_kernel_above: float | None, temperature: float) -> None:
        self.kernel = as_kernel(kernel)
        self.shard_kernel_above = check_shard_kernel_above(
            SHARD_KERNEL_ABOVE if shard_kernel_above is None else shard_kernel_above)
        self.temperature = temperature
        self.sharded: bool | None = None
        self._token = 0  # names this step's points to the workers, which cache their distances

    def __call__(self, points: np.ndarray, grads: np.ndarray, backend) -> np.ndarray:
        n, d = points.shape
        kernel, temperature, k = self.kernel, self.temperature, backend.num_workers
        self.sharded = k > 0 and n >= k and n * n * d >= self.shard_kernel_above
        if not self.sharded:
            H = kernel.sq_dists(points)
            return kernel.phi_rows(points, grads, kernel.bandwidth(points, H), temperature, H=H)
        self._token += 1
        own = [(lo, hi, self._token) for lo, hi in particle_bounds(n, k)]
        X = backend.share(points)
        a, b = median_bracket(backend.call("stein_sample", (kernel, X), own), n * n)
        med = median_from(backend.call("stein_bracket", (kernel, X), [(*o, a, b) for o in own]),
                          n * n)
        if med is None:  # the sample misled the bracket: take every value
            med = median_from(backend.call("stein_bracket", (kernel, X),
                                           [(*o, -np.inf, np.inf) for o in own]), n * n)
        h = kernel.bandwidth_from_median(med, n)
        parts = backend.call("stein_rows", (kernel, X, backend.share(grads), h, temperature), own)
        return np.concatenate(parts, axis=0)


class Stein:
    """The Stein direction at an approximation's particles (or draws), over the full data.

    Attributes follow PyMC's ``Stein``, as arrays at the current parameters:
    ``input_joint_matrix`` (the points, n x D), ``logp_norm`` (log density at each point),
    ``dlogp`` (its gradients), ``Kxy``, ``dxkxy``, ``density_part_grad`` (``Kxy @ dlogp``),
    ``repulsive_part_grad`` (``dxkxy``), and ``grad``
    (``(density_part_grad / temperature + repulsive_part_grad) / n``).

    The log density is evaluated in this process on the whole data the approximation was
    fitted to (an inspection tool; fits evaluate it on the shard workers).

    Parameters
    ----------
    approx
        A fitted (or bound) approximation.
    kernel
        The kernel (default :class:`RBF`).
    use_histogram
        Use the particles of an Empirical approximation; otherwise ``draws`` points from q.
    temperature
        Divides the density part.
    draws, random_seed
        For ``use_histogram=False``: how many points to draw and the seed.
    """

    def __init__(self, approx, kernel=RBF, use_histogram: bool = True, temperature: float = 1,
                 draws: int = 100, random_seed: int | None = None) -> None:
        self.approx = approx
        self.kernel = as_kernel(kernel)
        self.temperature = check_temperature(temperature)
        self.use_histogram = bool(use_histogram)
        if self.use_histogram and not all(g.vfam == "empirical" for g in approx.groups):
            raise TypeError("use_histogram=True needs an Empirical approximation")
        self._draws, self._seed = int(draws), random_seed
        self._cache: dict = {}

    @property
    def input_joint_matrix(self) -> np.ndarray:
        if "X" not in self._cache:
            approx = self.approx
            if self.use_histogram:
                self._cache["X"] = approx.joint_histogram
            else:
                self._cache["X"] = approx.draw_flat(self._draws, np.random.default_rng(self._seed))
        return self._cache["X"]

    def _logp(self) -> tuple[np.ndarray, np.ndarray]:
        if "logp" not in self._cache:
            self._cache["logp"] = self.approx.full_logp_and_grad(self.input_joint_matrix)
        return self._cache["logp"]

    @property
    def logp_norm(self) -> np.ndarray:
        return self._logp()[0]

    @property
    def dlogp(self) -> np.ndarray:
        return self._logp()[1]

    def _kernel(self):
        if "K" not in self._cache:
            self._cache["K"] = self.kernel(self.input_joint_matrix)
        return self._cache["K"]

    @property
    def Kxy(self) -> np.ndarray:
        return self._kernel()[0]

    @property
    def dxkxy(self) -> np.ndarray:
        return self._kernel()[1]

    @property
    def density_part_grad(self) -> np.ndarray:
        return self.Kxy @ self.dlogp

    @property
    def repulsive_part_grad(self) -> np.ndarray:
        return self.dxkxy

    @property
    def grad(self) -> np.ndarray:
        n = self.input_joint_matrix.shape[0]
        return (self.density_part_grad / self.temperature + self.repulsive_part_grad) / n
