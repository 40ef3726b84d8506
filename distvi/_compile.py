"""How distvi compiles PyTensor graphs: the mode, and a BLAS linked from a pip install.

A pip-installed PyTensor finds no BLAS to link its C code against, so its matrix-vector and
matrix-matrix products fall back to Python ops around NumPy (``Gemv``, ``Dot22``): on a
1,000 x 20 minibatch the two products of a GLM's gradient cost ~30 µs that way against ~8 µs
linked. distvi depends on ``scipy-openblas32`` (an OpenBLAS of a few MB whose symbols carry a
``scipy_`` prefix) and compiles its own functions with flags that link it and map PyTensor's
Fortran BLAS names onto the prefixed ones.

The bundled OpenBLAS runs on one thread (``DISTVI_BLAS_THREADS`` to change it). It is a
second BLAS in the process beside NumPy's, and two thread pools that take turns spin-wait on
each other's cores: on 2 cores, an SVGD step with 500 particles (the data term through the
linked BLAS, the kernel through NumPy's) ran at 29 it/s with two threads each against 66 it/s
with the linked one on one thread.

The flags apply only while distvi compiles (``pytensor.config.change_flags`` around each
``pytensor.function``): functions the user compiles, PyMC's included, keep the user's setting.
A BLAS the user configured (``blas__ldflags`` set) is used as it is. ``DISTVI_BLAS=off`` turns
the linking off.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import pytensor
from pytensor.compile.mode import get_mode

# every Fortran BLAS routine PyTensor's C code calls (pytensor/tensor/blas_headers.py)
_ROUTINES = (
    "sgemm dgemm cgemm zgemm sgemv dgemv cgemv zgemv sger dger cgerc cgeru zgerc zgeru "
    "sdot ddot saxpy daxpy caxpy zaxpy scopy dcopy ccopy zcopy sscal dscal cscal zscal"
).split()


@functools.cache
def _bundled_flags() -> str:
    try:
        import scipy_openblas32
    except ImportError:
        return ""
    lib = scipy_openblas32.get_lib_dir()
    name = scipy_openblas32.get_library()  # "scipy_openblas": libscipy_openblas.so
    prefix = "scipy_"
    # the same file the compiled modules load (by their rpath), so the same library instance
    set_threads = getattr(ctypes.CDLL(os.path.join(lib, f"lib{name}.so")), f"{prefix}openblas_set_num_threads")
    set_threads(blas_threads())
    renames = " ".join(f"-D{r}_={prefix}{r}_" for r in _ROUTINES)
    return f"-L{lib} -l{name} -Wl,-rpath,{lib} {renames}"


def blas_threads() -> int:
    """Threads of the bundled OpenBLAS: ``DISTVI_BLAS_THREADS``, default 1."""
    value = os.environ.get("DISTVI_BLAS_THREADS", "1")
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"DISTVI_BLAS_THREADS must be an integer >= 1, got {value!r}")
    return n


def blas_flags() -> str:
    """The ``blas__ldflags`` distvi compiles with: the user's if set, else the bundled
    OpenBLAS, else ``""`` (``DISTVI_BLAS=off``, or ``scipy-openblas32`` missing)."""
    import warnings

    with warnings.catch_warnings():  # the first read warns that pip's PyTensor has no BLAS
        warnings.simplefilter("ignore")
        user = pytensor.config.blas__ldflags
    if user:
        return user
    if os.environ.get("DISTVI_BLAS", "auto").strip().lower() in ("off", "0", "no", "false", "none"):
        return ""
    return _bundled_flags()


def compile_mode(check_bounds: bool):
    """PyMC's treatment of parameter checks: an invalid parameter gives a -inf log density
    (not an exception), or no check at all when the model has ``check_bounds=False``."""
    rewrite = ("local_check_parameter_to_ninf_switch" if check_bounds
               else "local_remove_check_parameter")
    return get_mode(None).including(rewrite)


def function(inputs, outputs, **kwargs: Any):
    """``pytensor.function`` with distvi's BLAS flags in effect while it compiles."""
    with pytensor.config.change_flags(blas__ldflags=blas_flags()):
        return pytensor.function(inputs, outputs, **kwargs)
