"""What request parsing hands the worker: one generation job, independent of the API it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.types import SamplingParams

API_LMI = "lmi"
API_COMPLETION = "openai-completion"
API_CHAT = "openai-chat"
API_TGI = "tgi"
APIS = (API_LMI, API_COMPLETION, API_CHAT, API_TGI)

ROUTE_INVOCATIONS = "invocations"
"""/invocations, /predictions/..., /models/.../invoke: output shape can follow option.output_formatter."""
ROUTE_V1 = "v1"
"""/v1/completions, /v1/chat/completions: always OpenAI framing (SSE + [DONE] when streaming)."""
ROUTE_TGI = "tgi"
"""/generate and /generate_stream."""


@dataclass
class ParsedRequest:
    """One prompt (or chat) plus how to generate and how to answer.

    Exactly one of ``prompt`` and ``messages`` is set; for chat the worker renders ``messages`` with the
    tokenizer's chat template and passes the rendered text to ``create_writer`` as ``prompt_text``.
    """

    api: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: list[dict] | None = None
    stream: bool = False
    details: bool = False
    details_explicit: bool = False
    """Whether the client set ``details`` itself (tgi_compat turns details on only when it did not)."""
    return_full_text: bool = False
    """Prepend the prompt to the generated text (LMI/TGI ``return_full_text``, OpenAI ``echo``)."""
    decoder_input_details: bool = False
    route: str = ROUTE_INVOCATIONS
    model: str | None = None
    logprobs: int | None = None
    """OpenAI only: None = no logprobs; N = logprobs with N top alternatives per token."""
    include_usage: bool = False
    """OpenAI streaming: send a final usage chunk (``stream_options.include_usage``)."""
    max_new_tokens_set: bool = False
    """False when the default was used, so the worker may clamp it to the context window instead."""
