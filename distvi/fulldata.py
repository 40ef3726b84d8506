"""The approximation against the model over all its data: the full-data log density and its
gradient, Monte-Carlo estimates of the loss, and PSIS diagnostics. Outside a fit the data
attached to the approximation is read here; a fit's Inference evaluates it on its workers."""

from __future__ import annotations

import numpy as np

from distvi._validate import is_int


class FullData:
    """The full-data evaluations of an :class:`~distvi.approximations.Approximation` (a base
    class of it)."""

    def full_logp_and_grad(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log density of the model over all its data, and its gradient, at flat points (S, D).

        Evaluated in this process (the data is read here): for inspection, e.g.
        :class:`~distvi.stein.Stein`; fits evaluate the data term on their workers.
        """
        ad = self.require_bound()
        source = getattr(self, "source", None)
        if source is None:
            raise RuntimeError("the approximation has no data attached: fit it, or build it "
                               "with data=...")
        pts = np.ascontiguousarray(np.atleast_2d(np.asarray(points, dtype="float64")))
        rows = source.read(0, source.n_rows)
        logp, grad = ad.data_term().compile(pts.shape[0])(pts, *rows.values(), np.array(1.0))
        plogp, pgrad = ad.compile_prior_term(pts.shape[0])(pts)
        return logp + plogp, grad + pgrad

    def diagnose(self, draws: int = 1000, random_seed: int | None = None):
        """PSIS k̂ of q against the full-data posterior (Yao et al. 2018): see
        :func:`distvi.diagnostics.diagnose`. The shard workers evaluate the whole data."""
        from distvi.diagnostics import diagnose

        return diagnose(self, draws, random_seed)

    def _data_and_prior(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The full-data log-likelihood (on the fit's workers when there is a fit, else read
        here) and the prior term at flat points (S, D)."""
        ad = self.require_bound()
        n = points.shape[0]
        prior = ad.compile_prior_term(n)(points)[0]
        if self.shard_data is not None:
            return self.shard_data.logp(points), prior
        if self.source is None or not getattr(self.source, "n_rows", 0):
            return np.zeros(n), prior
        rows = self.source.read(0, self.source.n_rows)
        logp = ad.data_term().compile(n, True, False)(points, *rows.values(), np.array(1.0))[0]
        return logp, prior

    def mc_loss(self, n_mc: int, beta: float = 1.0, rng: np.random.Generator | None = None) -> float:
        """A Monte-Carlo estimate of the loss ``-datalogp + beta (logq - varlogp)`` (the
        negative ELBO for ``beta=1``) from ``n_mc`` draws of q, on all the data; divided by
        ``N / B`` when :attr:`scale_cost_to_minibatch` is set, as PyMC reports it."""
        if not is_int(n_mc) or n_mc < 1:
            raise ValueError(f"the number of draws must be an int >= 1, got {n_mc!r}")
        rng = np.random.default_rng() if rng is None else rng
        points = self.draw_flat(int(n_mc), rng)
        data, prior = self._data_and_prior(points)
        loss = float(np.mean(-data + beta * (self.logq_at(points) - prior)))
        if self.scale_cost_to_minibatch and self.shard_data is not None:
            loss /= self.shard_data.cost_divisor()
        return loss
