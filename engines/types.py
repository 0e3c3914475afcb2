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
    """EOS and ``stop_token_ids`` are blocked until this many tokens were generated."""
    prompt_logprobs: bool = False
    """Report each prompt token's log-probability given the tokens before it (LMI/TGI
    ``decoder_input_details``); causal models only, on the first event of completion 0."""
    n: int = 1
    """Completions the client gets back (OpenAI/vLLM ``n``)."""
    best_of: int | None = None
    """Completions to generate when more than ``n`` (the writer returns the ``n`` with the highest
    cumulative log-probability); None = ``n``. Engines fork ``num_sequences`` ways, never ``n``."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted once from the logit of every token already generated (not the prompt)."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted per occurrence from the logit of every token already generated."""
    min_p: float = 0.0
    """vLLM: when sampling, drop tokens whose probability (after temperature) is below min_p x the top one."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before any other processing."""
    stop_token_ids: tuple[int, ...] = ()
    """Generating one of these ends the completion ("stop_sequence"); its text is not part of the output."""
    top_logprobs: int = 0
    """How many most likely alternatives (0..20) to report with every generated token."""

    @property
    def num_sequences(self) -> int:
        """Completions the engine generates for this request: it prefills once and forks this many ways."""
        return max(self.n, self.best_of or 0)


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
    index: int = 0
    """Which of the request's ``n`` completions this token belongs to."""
    prompt_tokens: tuple[tuple[int, str, float | None], ...] = ()
    """(id, text, log-probability) of every prompt token (the first has none), on the first event of
    completion 0 when ``params.prompt_logprobs`` asked for them."""
    cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache, on each completion's first event (OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``)."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The ``params.top_logprobs`` most likely tokens (token id, log-probability), most likely first.

    Log-probabilities (these and ``logprob``) come from the model's distribution after logit_bias,
    the min_new_tokens block and the penalties, but before temperature, min_p, top-k and top-p.
    """
    top_texts: tuple[str, ...] = ()
    """The text of each ``top_logprobs`` token decoded on its own, in the same order."""
