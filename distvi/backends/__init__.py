"""Where the shard workers run: ``local`` (in the driver's process) or ``ray`` (actors).

Both implement :class:`~distvi.backends.base.Backend`.
"""

from distvi.backends.base import Backend, WorkerError
from distvi.backends.local import LocalBackend

__all__ = ["Backend", "LocalBackend", "WorkerError"]
