"""API formats for the rolling-batch worker: request body -> ParsedRequest, TokenEvents -> response bytes.

Families: LMI (/invocations, incl. OpenAI chat bodies), OpenAI /v1/completions and /v1/chat/completions,
and TGI /generate and /generate_stream. Pure functions and classes; no HTTP framework, no torch.
"""

from handlers.builtin.formats.errors import RequestError
from handlers.builtin.formats.factory import OUTPUT_FORMATTERS, create_writer, output_mode
from handlers.builtin.formats.lmi_request import parse_lmi
from handlers.builtin.formats.openai_request import parse_chat, parse_completion
from handlers.builtin.formats.parse import decode_body, parse_request
from handlers.builtin.formats.request import (
    API_CHAT,
    API_COMPLETION,
    API_LMI,
    API_TGI,
    APIS,
    ROUTE_INVOCATIONS,
    ROUTE_TGI,
    ROUTE_V1,
    ParsedRequest,
)
from handlers.builtin.formats.sampling import check_token_ids
from handlers.builtin.formats.tgi_request import parse_tgi
from handlers.builtin.formats.writer import GENERATION_ERROR_CODE, ResponseWriter

__all__ = [
    "API_CHAT",
    "API_COMPLETION",
    "API_LMI",
    "API_TGI",
    "APIS",
    "GENERATION_ERROR_CODE",
    "OUTPUT_FORMATTERS",
    "ROUTE_INVOCATIONS",
    "ROUTE_TGI",
    "ROUTE_V1",
    "ParsedRequest",
    "RequestError",
    "ResponseWriter",
    "check_token_ids",
    "create_writer",
    "decode_body",
    "output_mode",
    "parse_chat",
    "parse_completion",
    "parse_lmi",
    "parse_request",
    "parse_tgi",
]
