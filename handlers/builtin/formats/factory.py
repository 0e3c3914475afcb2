"""Pick the writer for a parsed request: API family x stream mode x option.output_formatter/tgi_compat."""

from __future__ import annotations

from handlers.builtin.formats.lmi_writer import LmiJsonWriter, LmiStreamWriter
from handlers.builtin.formats.openai_chat_writer import ChatWriter
from handlers.builtin.formats.openai_completion_writer import CompletionWriter
from handlers.builtin.formats.request import API_CHAT, API_LMI, API_TGI, ROUTE_INVOCATIONS, ParsedRequest
from handlers.builtin.formats.tgi_writer import TgiGenerateWriter, TgiStreamWriter
from handlers.builtin.formats.writer import ResponseWriter, WriterContext

OUTPUT_FORMATTERS = ("json", "jsonlines", "sse", "json_chat", "jsonlines_chat")
"""``option.output_formatter`` values understood on /invocations (LMI's names; ``_chat`` = same framing)."""


def output_mode(parsed: ParsedRequest, output_formatter: str | None, tgi_compat: bool) -> str:
    """ "json" (one body), "jsonlines" or "sse".

    /v1 routes always speak OpenAI (SSE when streaming) and TGI routes TGI; on /invocations
    ``option.output_formatter`` wins over the request's ``stream`` flag, as in LMI.
    """
    if parsed.route != ROUTE_INVOCATIONS:
        return "sse" if parsed.stream else "json"
    if output_formatter is None:
        if not parsed.stream:
            return "json"
        return "sse" if tgi_compat and parsed.api == API_LMI else "jsonlines"
    if output_formatter not in OUTPUT_FORMATTERS:
        raise ValueError(
            f"option.output_formatter={output_formatter!r} is not supported; "
            f"use one of {', '.join(OUTPUT_FORMATTERS)}"
        )
    return output_formatter.removesuffix("_chat")


def create_writer(
    parsed: ParsedRequest,
    request_id: str,
    model_name: str,
    prompt_text: str,
    prompt_tokens: int,
    output_formatter: str | None = None,
    tgi_compat: bool = False,
) -> ResponseWriter:
    """The writer for one request. ``prompt_text`` is the text the model saw (chat: the rendered template)."""
    compat = tgi_compat and parsed.api == API_LMI
    ctx = WriterContext(parsed, request_id, model_name, prompt_text, prompt_tokens, compat)
    if parsed.api == API_TGI:
        return TgiStreamWriter(ctx) if parsed.stream else TgiGenerateWriter(ctx)
    mode = output_mode(parsed, output_formatter, compat)
    if parsed.api == API_LMI:
        return LmiJsonWriter(ctx) if mode == "json" else LmiStreamWriter(ctx, use_sse=mode == "sse")
    cls = ChatWriter if parsed.api == API_CHAT else CompletionWriter
    return cls(ctx, stream=mode != "json", use_sse=mode == "sse")
