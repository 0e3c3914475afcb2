"""DJL module path of `PairList`, so `from djl_python.pair_list import PairList` keeps working."""

from handlers.djl_api import PairList

__all__ = ["PairList"]
