"""Compatibility package: lets DJL `model.py` files keep `from djl_python import Input, Output`.

The names exported here are the ones DJL's own `djl_python/__init__.py` exports.
"""

from djl_python.session_manager import Session, SessionManager
from handlers.djl_api import Input, Output, PairList

__all__ = ["Input", "Output", "PairList", "Session", "SessionManager"]
