"""Joining a Ray cluster, or starting a local one, from the driver.

Three things ``ray.init`` does not do for distvi: a local instance's auth token is written
readable by its owner only, a cluster that would refuse this process is reported at once
(not after ~20 s of retries), and the driver's own SIGINT/SIGTERM handlers survive it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading

from distvi._lean import WORKER_ENV
from distvi.backends.base import WorkerError

_started_here = False  # a local instance distvi started in this process (it stays up for later fits)


_joining = None  # a Background join_or_start begun by begin_joining
_this_thread = threading.local()  # started_ray: this thread's ray.init started a local instance


def begin_joining(address: str | None) -> None:
    """Begin :func:`join_or_start` in the background (the driver builds the workers' graph
    meanwhile); the next :func:`join_or_start` waits for it. Nothing when Ray is up. Ray
    is imported in the background too when it is not yet (~0.4 s)."""
    import sys

    global _joining
    ray = sys.modules.get("ray")
    if _joining is None and not (ray is not None and ray.is_initialized()):
        _joining = Background(lambda: _join_or_start(address))


def joining() -> bool:
    """Whether a join begun by :func:`begin_joining` waits to be finished by
    :func:`join_or_start`."""
    return _joining is not None


def ray_up() -> bool:
    """Whether this process is connected to Ray (importing it)."""
    import ray

    return ray.is_initialized()


def ray_tls() -> bool:
    """Whether Ray's own connections use TLS here (``RAY_USE_TLS``, as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true")


def join_or_start(address: str | None) -> bool:
    """Join the cluster at ``address`` (default: ``RAY_ADDRESS``), else start a local Ray
    instance; True when one was started here (and is the caller's to shut down)."""
    global _joining
    if _joining is not None:  # begun in the background: its outcome, error included
        joining, _joining = _joining, None
        return joining.result()
    return _join_or_start(address)


def _join_or_start(address: str | None) -> bool:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # in the main thread the handlers are set back through Python; off it at the C level
    main = threading.current_thread() is threading.main_thread()
    handlers, kept = python_handlers(), None if main else sigterm_action()
    # off the main thread Ray sets no SIGTERM handler and says so at warning level: distvi
    # keeps the program's handlers either way (see restore_handlers), so that is not news
    quiet = logging.getLogger("ray._private.worker")
    quiet.addFilter(_no_sigterm_note)
    # ray.init changes the environment from this thread (Ray sets PYTHONBREAKPOINT and
    # RAY_AUTH_MODE, distvi the workers' flags): a process that another thread spawns with
    # vfork meanwhile reads it mid-change (PyTensor's g++, spawned by the driver's compile,
    # failed with EFAULT, measured); with fork the child has its own copy
    vfork = None if main else getattr(subprocess, "_USE_VFORK", None)
    if vfork:
        subprocess._USE_VFORK = False
    try:
        started = _init(ray, address)
    finally:  # also when ray.init failed after setting its own
        quiet.removeFilter(_no_sigterm_note)
        restore_handlers(handlers)
        set_sigterm_action(kept)
        if vfork:
            subprocess._USE_VFORK = vfork
    return started


def sigterm_action() -> bytes | None:
    """The process's SIGTERM action as the kernel holds it (opaque bytes), to set back with
    :func:`set_sigterm_action`; None where libc's ``sigaction`` cannot be called.

    ``ray.init`` installs Ray's crash handler for SIGTERM at the C level; it stands in front
    of the program's handler (a fit's deferral, which then cannot stop the process cleanly:
    it aborts at exit) and, off the main thread, Python cannot set its own back."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # larger than any platform's struct sigaction
        if libc.sigaction(int(signal.SIGTERM), None, buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return buf.raw


def set_sigterm_action(action: bytes | None) -> None:
    """Set back an action from :func:`sigterm_action` — when Python's own table still says
    a Python handler is set (the kernel must then call Python's); when it now says the
    default or ignore (the program changed it meanwhile), that, as Python would have set it."""
    if action is None:
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    now = signal.getsignal(signal.SIGTERM)
    if callable(now):
        libc.sigaction(int(signal.SIGTERM), ctypes.create_string_buffer(action, len(action)), None)
    elif now in (signal.SIG_DFL, signal.SIG_IGN):
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        libc.signal(int(signal.SIGTERM), int(now))


def _no_sigterm_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SIGTERM handler is not set")


class Background:
    """``fn()`` in a daemon thread; :meth:`result` waits for it and raises its error.

    A thread that started the local Ray instance stays (parked) for the life of the
    process: Ray's processes are bound to the thread that started them (the kernel kills
    them when it ends), so Ray would die with a thread that returned."""

    def __init__(self, fn) -> None:
        self.value, self.error = None, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,), name="distvi-ray-start",
                                       daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()
        if getattr(_this_thread, "started_ray", False):
            threading.Event().wait()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def _init(ray, address: str | None) -> bool:
    if address:
        check_can_join(address)
        ray.init(address=address, log_to_driver=True)
        started = False
    else:
        global _started_here
        owner_only_token()
        # Ray announces at warning level that it turned token auth on; distvi chose that
        # and wrote the owner-only token itself, so the announcement is not the user's news
        note = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = note.level
        note.setLevel(logging.ERROR)
        # the workers inherit these: a compile cache of their own, lighter imports (_lean)
        workers_env = {"PYTENSOR_FLAGS": worker_pytensor_flags(os.environ.get("PYTENSOR_FLAGS")),
                       WORKER_ENV: "1"}
        try:
            with environment(workers_env):
                ray.init(include_dashboard=False, log_to_driver=True)
        finally:
            note.setLevel(level)
        started = _started_here = _this_thread.started_ray = True
    return started


@contextlib.contextmanager
def environment(updates: dict[str, str]):
    """``os.environ`` with ``updates`` while inside; each variable as it was after."""
    before = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_pytensor_flags(flags: str | None) -> str:
    """``PYTENSOR_FLAGS`` for the workers of a local instance: the driver's, with PyTensor's
    compile cache in a directory of the workers' own. On opening, PyTensor's cache loads
    every entry it holds, and a user's cache holds PyMC's (loading them imports PyMC: ~3 s
    of CPU in each worker, all at once, measured); the workers' cache holds only their data
    terms. It fills on a machine's first Ray fit and is reused after."""
    import pytensor

    own = "compiledir_format=distvi-worker_" + pytensor.config.compiledir_format
    return f"{flags},{own}" if flags else own


def stop_started(signum: int) -> None:
    """After a fit stopped for ``signum``: on SIGTERM (the process is on its way out) shut
    down the local Ray instance distvi started here, if any; after Ctrl-C it stays up for
    the next fit, and Ray stops it at exit."""
    import signal

    global _started_here
    if _started_here and signum == signal.SIGTERM:
        import ray

        _started_here = False
        ray.shutdown()


def local_instance() -> bool:
    """Whether this process started the Ray node it is on (``ray.init`` without an address):
    a fixed set of CPUs, no autoscaler to add more."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and getattr(node, "head", False)
                and getattr(node, "all_processes", None))


def token_path() -> str | None:
    """Where Ray reads its auth token from when no ``RAY_AUTH_TOKEN`` is given."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")


def owner_only_token() -> None:
    """Before distvi starts a local Ray instance: Ray would write a new auth token readable by
    everyone on the machine (mode 0644); distvi writes it first, readable by its owner only,
    and Ray uses it. An existing token file is narrowed to its owner as well."""
    path = token_path()
    if path is None or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    import secrets
    import stat

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:  # never through a symlink
            os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def python_handlers() -> dict:
    """The Python-level SIGINT/SIGTERM handlers (a fit's deferral, or the program's own)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)
            if callable(signal.getsignal(sig))}


def restore_handlers(handlers: dict) -> None:
    """After ``ray.init``, which sets a SIGTERM handler of its own that exits at once: the
    handlers from before, so a fit stops at a step boundary even while its workers start."""
    import signal

    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def check_can_join(address: str) -> None:
    """Ask the cluster's GCS, before ``ray.init``, whether this process may join: a
    token-protected cluster refuses a client without the token, which ``ray.init`` would only
    report after ~20 s of retries as a bare connection error."""
    if "://" in address or address == "auto":
        return  # Ray Client and address discovery: Ray's own checks apply
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise WorkerError(f"no Ray cluster answers at {address} ({err})") from None
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray version: no probe
        return
    try:
        GcsClient(address=address)
    except AuthenticationError:
        raise WorkerError(
            f"the Ray cluster at {address} requires an auth token and this process has none "
            f"(or the wrong one): set RAY_AUTH_MODE=token and give the cluster's token in "
            f"RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token "
            f"(`ray get-auth-token` on the head node prints it)") from None
    except Exception:
        return  # unreachable or other trouble: ray.init reports it
