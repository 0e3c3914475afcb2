"""Compatibility shim for `from djl_python.outputs import Output`."""

from handlers.djl_api import Output

__all__ = ["Output"]
