"""Compatibility shim for `from djl_python.inputs import Input`."""

from handlers.io import Input

__all__ = ["Input"]
