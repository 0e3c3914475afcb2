"""Model engines behind the serving layer, chosen by name; heavy imports happen only on creation."""

from __future__ import annotations

from collections.abc import Callable

from engines.base import (
    Engine,
    EngineConfig,
    EngineLoadError,
    GenerationEngine,
    RequestError,
    TaskRequest,
)
from engines.registry import Registry

__all__ = [
    "ENGINES",
    "GENERATION_ENGINES",
    "Engine",
    "EngineConfig",
    "EngineLoadError",
    "RequestError",
    "GenerationEngine",
    "TaskRequest",
    "create_engine",
    "create_generation_engine",
]

ENGINES = Registry[Callable[[EngineConfig], Engine]]("engine")


@ENGINES.register("hf")
def _create_hf_engine(config: EngineConfig) -> Engine:
    # Imported here so that `import engines` stays free of torch/transformers.
    from engines.hf.engine import HfEngine

    return HfEngine(config)


GENERATION_ENGINES = Registry[Callable[[EngineConfig], GenerationEngine]]("generation engine")
"""Text-generation engines behind the GenerationEngine contract; the handler serves them all alike."""


@GENERATION_ENGINES.register("native")
def _create_native_engine(config: EngineConfig) -> GenerationEngine:
    """Continuous batching over native Llama-family kernels (engines/llama, engines/rolling)."""
    from engines.rolling.factory import create_rolling_engine

    return create_rolling_engine(config)


@GENERATION_ENGINES.register("hf-generate")
def _create_hf_generate_engine(config: EngineConfig) -> GenerationEngine:
    """Lockstep batches over any transformers causal or encoder-decoder LM (streams token by token)."""
    from engines.hf.generate_engine import create_hf_generate_engine

    return create_hf_generate_engine(config)


def _lookup(registry: Registry, name: str) -> Callable:
    try:
        return registry.get(name)
    except KeyError as error:
        raise EngineLoadError(error.args[0]) from None


def create_engine(name: str, config: EngineConfig) -> Engine:
    """Build the task engine registered as `name`; unknown names fail listing the supported ones."""
    return _lookup(ENGINES, name)(config)


def create_generation_engine(name: str, config: EngineConfig) -> GenerationEngine:
    """Build the generation engine registered as `name`."""
    return _lookup(GENERATION_ENGINES, name)(config)
