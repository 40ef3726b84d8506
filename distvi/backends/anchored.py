"""Minibatch answers with a control variate: the data term's noise taken out near an anchor.

For a point z of a step, the workers' minibatch estimate ``g_B(z)`` of the full-data term is
replaced by ``g_B(z) - g_B(a) + g(a)``: the same step's minibatch estimate at an anchor
``a`` (evaluated with the step's points, so on the same rows) is subtracted and the exact
full-data value there added back. The expectation is unchanged (the estimate stays
unbiased); the noise is that of ``g_B(z) - g_B(a)``, which vanishes as z nears a — on big
data the posterior is narrow, so with the anchor at q's mean the minibatch noise nearly
disappears (the idea of control variates for stochastic-gradient MCMC, Baker, Fearnhead,
Fox and Nemeth 2019). Fits run until convergence use it on minibatches, anchored at each
phase's start (one full-data pass a phase).
"""

from __future__ import annotations

import numpy as np


class AnchoredBackend:
    """``backend`` with its answers corrected at ``anchor`` (D,), whose full-data
    log-likelihood and gradient are ``full_logp`` and ``full_grad``."""

    def __init__(self, backend, anchor: np.ndarray, full_logp: float, full_grad: np.ndarray) -> None:
        self.backend = backend
        self.anchor = np.asarray(anchor, dtype="float64")[None, :]
        self.full_logp, self.full_grad = float(full_logp), np.asarray(full_grad, dtype="float64")

    @property
    def num_workers(self) -> int:
        return self.backend.num_workers

    @property
    def last_compute_s(self) -> float:
        return self.backend.last_compute_s

    def evaluate(self, points: np.ndarray, step: int,
                 with_logp: bool = True) -> tuple[np.ndarray, np.ndarray]:
        logp, grad = self.backend.evaluate(np.concatenate([points, self.anchor]), step, with_logp)
        return (logp[:-1] - logp[-1] + self.full_logp,
                grad[:-1] - grad[-1] + self.full_grad)

    def share(self, array):
        return self.backend.share(array)

    def call(self, method: str, shared: tuple, per_worker: list[tuple]) -> list:
        return self.backend.call(method, shared, per_worker)

    def close(self) -> None:
        """The wrapped backend belongs to the fit: closing the wrapper leaves it running."""

    def __enter__(self) -> AnchoredBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
