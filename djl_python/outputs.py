"""Compatibility shim for `from djl_python.outputs import Output`."""

from handlers.io import Output

__all__ = ["Output"]
