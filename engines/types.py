"""Plain data of the generation-engine contract (engines/base.py): what a step takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (LMI parameter names)."""

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenEvent:
    """One generated token of one request; the last event of a request carries finish_reason."""

    request_id: str
    token_id: int
    text: str
    """Detokenised text this token adds (may be empty while a multi-byte character is incomplete)."""
    logprob: float
    finish_reason: str | None = None
    """None while running; "length", "eos_token", "stop_sequence", "cancelled" or "error" at the end."""
    error: str | None = None
