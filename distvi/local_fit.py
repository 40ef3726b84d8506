"""The fit settings a fit with local variables cannot take yet, refused before any work
(see :mod:`distvi.local_terms`)."""

from __future__ import annotations

from typing import Any


def check_local_fit(inference, until, store: Any, tracking: Any, average_from) -> None:
    """The fit settings not built yet for local variables, refused before any work."""
    locals_ = inference.shards.adapter.locals
    if not locals_:
        return
    names = [v.rv_name for v in locals_]
    if type(inference.objective).__name__ != "KL":
        raise ValueError(f"local variables {names} are fitted by a KL method (ADVI, "
                         "FullRankADVI, KLqp); Stein methods move particles of the global "
                         "variables only")
    refused = []
    if until is not None:
        refused.append("n=None (fit until converged)")
    if store is not None:
        refused.append("store= (the run store does not yet checkpoint the workers' local state)")
    if tracking not in (None, False):
        refused.append("tracking=")
    if average_from is not None:
        refused.append("average_from= (the workers' groups are not averaged)")
    if getattr(inference.objective, "beta", 1.0) != 1.0:
        refused.append("beta != 1")
    if refused:
        raise ValueError(f"with local variables {names}, these are not supported yet: "
                         + "; ".join(refused))
