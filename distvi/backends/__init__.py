"""Where the shard workers run: ``local`` (in the driver's process) or ``ray`` (actors)."""

from distvi.backends.local import LocalBackend

__all__ = ["LocalBackend"]
