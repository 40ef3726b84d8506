"""Results as ArviZ InferenceData."""

from __future__ import annotations


def sample_approx(approx, draws: int = 100, include_transformed: bool = True,
                  random_seed: int | None = None):
    """Draw from a fitted approximation (PyMC's ``sample_approx``): InferenceData with the
    free variables, deterministics and, by default, the transformed value variables."""
    return approx.sample(draws=draws, include_transformed=include_transformed,
                         random_seed=random_seed)
