"""The version of distvi (one place: the package and the run records read it here)."""

__version__ = "0.1.0"
