"""A Ray worker process's imports, made lighter.

PyTensor imports ``scipy.signal`` whole for one function (``convolve``, used only by its
convolution op): ~0.6 s of CPU in each worker process, measured, for a module a data term
almost never needs. In a worker, :func:`defer_scipy_signal` lets PyTensor bind a stand-in
that imports the real module on first use; the real ``scipy.signal`` is what any other
import gets. Numbers do not change: the stand-in calls the real function.
"""

from __future__ import annotations

import sys
import types

WORKER_ENV = "DISTVI_RAY_WORKER"  # set in the environment of the workers of a local instance


def lighten_a_worker() -> None:
    """In a process with :data:`WORKER_ENV` set: :func:`defer_scipy_signal`."""
    import os

    if os.environ.get(WORKER_ENV):
        defer_scipy_signal()


def defer_scipy_signal() -> None:
    """Import PyTensor with ``scipy.signal`` deferred (nothing when either is imported)."""
    if "pytensor" in sys.modules or "scipy.signal" in sys.modules:
        return

    def real():  # the real module: imported now, or already (by whatever imported it since)
        if sys.modules.get("scipy.signal") is stand_in:
            del sys.modules["scipy.signal"]
        import importlib

        return importlib.import_module("scipy.signal")

    def convolve(*args, **kwargs):
        return real().convolve(*args, **kwargs)

    stand_in = types.ModuleType("scipy.signal")
    stand_in.convolve = convolve

    def other(name):  # any other name: the real one's (not the import system's questions)
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(real(), name)

    stand_in.__getattr__ = other
    sys.modules["scipy.signal"] = stand_in
    try:
        import pytensor.tensor  # noqa: F401  (binds the stand-in's convolve)
    finally:
        if sys.modules.get("scipy.signal") is stand_in:
            del sys.modules["scipy.signal"]
        scipy = sys.modules.get("scipy")
        if scipy is not None and scipy.__dict__.get("signal") is stand_in:
            del scipy.signal
