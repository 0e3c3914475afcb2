"""The narrow engine contract: plain data in, plain data out; no HTTP, no Input/Output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to load a model, resolved from `option.*` keys by the handler."""

    model_path: str
    """Local folder with the weights (config.json + safetensors, or a .gguf file)."""
    task: str | None = None
    """HF task; inferred from the architecture when None."""
    dtype: str = "auto"
    """fp32, fp16, bf16 or auto (the checkpoint's dtype, fp32 on CPU for fp16 checkpoints)."""
    trust_remote_code: bool = False
    revision: str | None = None
    allow_unsafe_weights: bool = False
    """Permit pickle checkpoints (.bin/.pt), which can run arbitrary code when loaded."""
    gguf_file: str | None = None
    """Name of the GGUF file inside model_path, when the model is shipped as GGUF."""
    device: str = "cpu"
    extra: dict[str, str] = field(default_factory=dict)
    """Remaining option.* keys, for engine-specific settings."""


@dataclass(frozen=True)
class TaskRequest:
    """One request to a task engine: one or more inputs sharing the same parameters."""

    inputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)


class EngineLoadError(RuntimeError):
    """The model cannot be loaded; the message says why and how to fix it."""


class RequestError(ValueError):
    """A request is invalid for this engine (bad parameter); maps to HTTP 400/424."""


class Engine(Protocol):
    """A loaded model that serves one task."""

    task: str

    def run(self, requests: list[TaskRequest]) -> list[list[Any]]:
        """Serve a batch of requests; returns, per request, one JSON-able result per input."""
        ...
