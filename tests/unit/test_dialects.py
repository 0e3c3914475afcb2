"""One error policy per dialect, whatever layer failed (serving.dialects)."""

from __future__ import annotations

import pytest

from serving.dialects import QUEUE_FULL_TYPE, Api, api_for_path, error_reply


def test_routes_map_to_their_api_and_unknown_paths_to_lmi():
    assert api_for_path("/v1/completions") is Api.OPENAI_COMPLETIONS
    assert api_for_path("/generate_stream") is Api.TGI_STREAM
    assert api_for_path("/") is Api.TGI_COMPAT
    assert api_for_path("/invocations") is Api.LMI
    assert api_for_path("/nowhere") is Api.LMI
    assert {a.dialect for a in Api} == {"lmi", "openai", "tgi"}


@pytest.mark.parametrize(
    ("api", "code", "error_type", "status"),
    [
        (Api.LMI, 503, QUEUE_FULL_TYPE, 503),
        (Api.OPENAI_CHAT, 503, QUEUE_FULL_TYPE, 429),
        (Api.TGI_GENERATE, 503, QUEUE_FULL_TYPE, 429),
        (Api.TGI_COMPAT, 503, QUEUE_FULL_TYPE, 429),
        (Api.OPENAI_COMPLETIONS, 503, "WlmShutdownException", 503),  # not overload: stays 503
        (Api.TGI_STREAM, 400, "", 422),
        (Api.TGI_GENERATE, 500, "", 424),
        (Api.TGI_GENERATE, 424, "", 424),
        (Api.TGI_GENERATE, 504, "PredictTimeoutException", 504),
        (Api.OPENAI_COMPLETIONS, 504, "PredictTimeoutException", 504),
        (Api.LMI, 424, "", 424),
    ],
)
def test_statuses_follow_each_ecosystem(api: Api, code: int, error_type: str, status: int):
    assert error_reply(api, code, "why", error_type)[0] == status


def test_bodies_have_each_dialects_shape():
    assert error_reply(Api.LMI, 503, "full", QUEUE_FULL_TYPE)[1] == {
        "code": 503,
        "type": QUEUE_FULL_TYPE,
        "message": "full",
        "error": "full",
    }
    assert error_reply(Api.OPENAI_CHAT, 503, "full", QUEUE_FULL_TYPE)[1] == {
        "error": {"message": "full", "type": "rate_limit_exceeded", "param": None, "code": 429}
    }
    assert error_reply(Api.OPENAI_CHAT, 400, "bad")[1]["error"]["type"] == "invalid_request_error"
    assert error_reply(Api.OPENAI_CHAT, 500, "died")[1]["error"]["type"] == "server_error"
    assert error_reply(Api.TGI_GENERATE, 503, "full", QUEUE_FULL_TYPE)[1] == {
        "error": "full",
        "error_type": "overloaded",
    }
    assert error_reply(Api.TGI_GENERATE, 400, "bad")[1] == {"error": "bad", "error_type": "validation"}
    assert error_reply(Api.TGI_GENERATE, 500, "boom")[1] == {"error": "boom", "error_type": "generation"}
