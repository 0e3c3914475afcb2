"""Compatibility shim for `from djl_python.inputs import Input`."""

from handlers.djl_api import Input

__all__ = ["Input"]
