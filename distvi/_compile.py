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
import pytensor.tensor as pt
from pytensor.compile.mode import get_mode
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op

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


_assumed: str | None = None  # a Ray worker's BLAS, as its driver found it (see assume_blas)


def compiler_facts() -> dict:
    """What this process found out about compiling C, for its Ray workers: which BLAS
    :func:`blas_flags` gives (``"user"``, ``"bundled"`` or ``"off"``) and, with the host's
    name, the CPU flags PyTensor's compiler detected."""
    import socket

    from pytensor.link.c.cmodule import GCC_compiler

    flags = blas_flags()
    GCC_compiler.compile_args()  # detects the CPU's flags (once per process)
    march = GCC_compiler.march_flags
    return {"blas": "off" if not flags else "bundled" if flags == _bundled_flags() else "user",
            "host": socket.gethostname(), "march": None if march is None else list(march)}


def adopt_compiler_facts(facts: dict | None) -> None:
    """In a Ray worker (a process of distvi's own): take its driver's findings instead of
    finding them again. PyTensor finds a BLAS's flags and the CPU's by compiling and running
    test programs, ~0.4 s each, measured, at every worker start. The BLAS finding is set as
    ``blas__ldflags`` (``"user"``: the worker reads its own); the CPU flags only on the
    driver's own host (another machine may have another CPU)."""
    import socket

    from pytensor.link.c.cmodule import GCC_compiler

    global _assumed
    facts = facts or {}
    if facts.get("blas") in ("bundled", "off") and _assumed is None:
        _assumed = facts["blas"]
        pytensor.config.blas__ldflags = blas_flags()
    if (facts.get("march") is not None and facts.get("host") == socket.gethostname()
            and GCC_compiler.march_flags is None):
        GCC_compiler.march_flags = list(facts["march"])


def blas_flags() -> str:
    """The ``blas__ldflags`` distvi compiles with: the user's if set, else the bundled
    OpenBLAS, else ``""`` (``DISTVI_BLAS=off``, or ``scipy-openblas32`` missing)."""
    import warnings

    if _assumed is not None:
        return _bundled_flags() if _assumed == "bundled" else ""
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


# ------------------------------------------------------------------ the other compiled forms
def jax_imports() -> bool:
    """Whether the ``jax`` package imports (the JAX form of blocks and data terms)."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def block_mode(form: str, check_bounds_mode):
    """The compile mode of ``form``, with the model's parameter-check rewrite of
    ``check_bounds_mode`` (the C mode distvi compiles everything else with)."""
    if form == "c":
        return check_bounds_mode
    if form == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        _register_jax_window()
    mode = get_mode(form.upper())
    for rewrite in ("local_check_parameter_to_ninf_switch", "local_remove_check_parameter"):
        if rewrite in check_bounds_mode.provided_optimizer.include:
            mode = mode.including(rewrite)
    return mode


class Window(Op):
    """``x[start:start + length]`` along the first axis, ``length`` fixed: what a shard's
    minibatch is inside a block (a dynamic slice in JAX, a view elsewhere)."""

    __props__ = ("length",)
    view_map = {0: [0]}

    def __init__(self, length: int) -> None:
        self.length = int(length)

    def make_node(self, x, start):
        x, start = pt.as_tensor(x), pt.as_tensor(start)
        out = pt.tensor(dtype=x.dtype, shape=(self.length, *x.type.shape[1:]))
        return Apply(self, [x, start], [out])

    def perform(self, node, inputs, output_storage) -> None:
        x, start = inputs
        output_storage[0][0] = x[int(start):int(start) + self.length]


_JAX_WINDOW = []


def _register_jax_window() -> None:
    if _JAX_WINDOW:
        return
    import jax
    from pytensor.link.jax.dispatch import jax_funcify

    @jax_funcify.register(Window)
    def _window(op, **kwargs):
        length = op.length

        def window(x, start):
            return jax.lax.dynamic_slice_in_dim(x, start, length, axis=0)

        return window

    _JAX_WINDOW.append(_window)
