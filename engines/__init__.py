"""Model engines behind the serving layer, chosen by name; heavy imports happen only on creation."""

from __future__ import annotations

from collections.abc import Callable

from engines.base import Engine, EngineConfig, EngineLoadError, RequestError, TaskRequest
from engines.registry import Registry

__all__ = [
    "ENGINES",
    "Engine",
    "EngineConfig",
    "EngineLoadError",
    "RequestError",
    "TaskRequest",
    "create_engine",
]

ENGINES = Registry[Callable[[EngineConfig], Engine]]("engine")


@ENGINES.register("hf")
def _create_hf_engine(config: EngineConfig) -> Engine:
    # Imported here so that `import engines` stays free of torch/transformers.
    from engines.hf.engine import HfEngine

    return HfEngine(config)


@ENGINES.register("rolling")
def _create_rolling_engine(config: EngineConfig) -> Engine:
    from engines.rolling.factory import create_rolling_engine

    return create_rolling_engine(config)  # type: ignore[return-value]


def create_engine(name: str, config: EngineConfig) -> Engine:
    """Build the engine registered as `name`; unknown names fail listing the supported ones."""
    try:
        factory = ENGINES.get(name)
    except KeyError as error:
        raise EngineLoadError(error.args[0]) from None
    return factory(config)
