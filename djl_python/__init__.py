"""Compatibility package: lets DJL `model.py` files keep `from djl_python import Input, Output`."""

from handlers.djl_api import Input, Output, PairList

__all__ = ["Input", "Output", "PairList"]
