"""The OpenAPI document against the implementation: the Flask routes, the request parsers' fields and
limits, each dialect's error replies, and the OpenAPI 3.1 schema itself."""

from __future__ import annotations

import json

import pytest
from openapi_checks import AUTOMATIC_METHODS, check, rule_path, validator
from openapi_spec_validator import OpenAPIV31SpecValidator

from handlers.builtin.formats import lmi_request, openai_request, sampling, tgi_request, validate
from serving import openapi_requests
from serving.app import create_app
from serving.config import ServingConfig
from serving.dialects import Api, api_for_path, error_reply
from serving.openapi import ERROR_CAUSES, ERROR_SCHEMAS, build_document

MANAGEMENT = {"enable_management_api": True, "management_address": "127.0.0.1:8081"}
CONFIGS = {
    "static": {},
    "multi-model": {"multi_model": True},
    "management-api": MANAGEMENT,
    "api-key": {"api_key": "secret", **MANAGEMENT},
}


class NoBroker:
    """create_app only keeps the client; no test here sends a request that reaches it."""


def config_of(name: str, **extra: object) -> ServingConfig:
    return ServingConfig(model_dir=None, model_name="tiny", **CONFIGS[name], **extra)  # type: ignore[arg-type]


def operations(document: dict) -> set[tuple[str, str]]:
    methods = {"get", "post", "put", "delete", "patch"}
    return {(path, m.upper()) for path, item in document["paths"].items() for m in item if m in methods}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_route_is_documented_and_every_documented_route_exists(name: str):
    config = config_of(name)
    app = create_app(config, NoBroker())  # type: ignore[arg-type]
    served = {
        (rule_path(rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - AUTOMATIC_METHODS
    }
    documented = operations(build_document(config))
    assert served - documented == set()
    assert documented - served == set()
    assert (("/models/{name}", "PUT") in served) == config.dynamic_models
    assert ("/predictions/{model}/{version}", "POST") in served


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("extra", [{}, {"settings": {"output_formatter": "sse", "max_model_len": 64}}])
def test_document_is_valid_openapi_3_1(name: str, extra: dict):
    document = build_document(config_of(name, **extra))
    OpenAPIV31SpecValidator(document).validate()
    assert document["openapi"] == "3.1.0"
    json.dumps(document)  # plain JSON, as GET /openapi.json sends it


def test_document_reflects_the_configuration():
    static = build_document(config_of("static", settings={"max_model_len": 64}))
    model = static["paths"]["/predictions/{model}"]["post"]["parameters"][0]
    assert model["schema"] == {"type": "string", "enum": ["tiny"]}
    limit = static["components"]["schemas"]["LmiRequest"]["properties"]["parameters"]["properties"]
    assert limit["max_new_tokens"]["maximum"] == 64
    assert "security" not in static["paths"]["/invocations"]["post"]
    assert "401" not in static["paths"]["/invocations"]["post"]["responses"]
    assert set(static["paths"]["/invocations"]["post"]["responses"]["200"]["content"]) == {
        "application/json",
        "application/jsonlines",
    }
    sse = build_document(config_of("static", settings={"output_formatter": "sse"}))
    assert set(sse["paths"]["/invocations"]["post"]["responses"]["200"]["content"]) == {"text/event-stream"}

    guarded = build_document(config_of("api-key"))
    assert guarded["paths"]["/models"]["servers"] == [
        {"url": "http://127.0.0.1:8081", "description": "DJL management API."}
    ]
    dynamic = guarded["paths"]["/predictions/{model}"]["post"]["parameters"][0]["schema"]
    assert "enum" not in dynamic
    for path, method in operations(guarded):
        op = guarded["paths"][path][method.lower()]
        open_route = path in ("/ping", "/openapi.json", "/metrics")
        assert ("security" in op) != open_route, path
        assert ("401" in op["responses"]) != open_route, path


def test_request_schemas_name_exactly_the_fields_the_parsers_accept():
    schemas = build_document(config_of("static"))["components"]["schemas"]

    def names(schema: dict) -> set[str]:
        return set(schema["properties"])

    lmi_params = schemas["LmiRequest"]["properties"]["parameters"]
    assert names(schemas["LmiRequest"]) == set(lmi_request.TOP_LEVEL)
    assert names(lmi_params) == {*lmi_request.PARAMETERS, *lmi_request.IGNORED, *lmi_request.NEUTRAL}
    tgi_params = schemas["TgiRequest"]["properties"]["parameters"]
    assert names(tgi_params) == {*tgi_request.PARAMETERS, *lmi_request.IGNORED, *lmi_request.NEUTRAL}
    completion = {
        *openai_request.COMPLETION_FIELDS,
        *openai_request.IGNORED,
        *openai_request.COMPLETION_NEUTRAL,
    }
    assert names(schemas["CompletionRequest"]) == completion
    chat = {*openai_request.CHAT_FIELDS, *openai_request.IGNORED, *openai_request.CHAT_NEUTRAL}
    assert names(schemas["ChatCompletionRequest"]) == chat
    assert (openapi_requests.MAX_N, openapi_requests.MAX_TOP_LOGPROBS) == (
        sampling.MAX_N,
        sampling.MAX_TOP_LOGPROBS,
    )
    assert openapi_requests.COMPLETION_MAX_LOGPROBS == openai_request.COMPLETION_MAX_LOGPROBS
    assert openapi_requests.SEED_MAX == validate.SEED_LIMIT - 1
    assert openapi_requests.SMALLEST_FACTOR == sampling.SMALLEST_FACTOR
    limits = (openapi_requests.PENALTY_LIMIT, openapi_requests.LOGIT_BIAS_LIMIT)
    assert limits == (sampling.PENALTY_LIMIT, sampling.LOGIT_BIAS_LIMIT)


@pytest.mark.parametrize(
    ("schema", "body", "valid"),
    [
        ("LmiRequest", {"inputs": "hi", "parameters": {"max_new_tokens": 8, "temperature": 0}}, True),
        ("LmiRequest", {"inputs": ["a", "b"], "parameters": None, "stream": None}, True),
        ("LmiRequest", {"inputs": "hi", "parameters": {"max_new_tokens": 65}}, False),
        ("LmiRequest", {"inputs": "hi", "parameters": {"max_new_token": 8}}, False),
        ("LmiRequest", {"inputs": "hi", "parameters": {"temperature": 1e-40, "do_sample": True}}, False),
        ("TgiRequest", {"inputs": "hi", "parameters": {"temperature": 0}}, False),
        ("CompletionRequest", {"prompt": "hi", "max_tokens": 4, "logprobs": 5, "suffix": ""}, True),
        ("CompletionRequest", {"prompt": "hi", "logprobs": 6}, False),
        ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, True),
        ("ChatCompletionRequest", {"messages": [{"role": "robot", "content": "hi"}]}, False),
    ],
)
def test_request_schemas_accept_and_refuse_like_the_parsers(schema: str, body: dict, valid: bool):
    document = build_document(config_of("static", settings={"max_model_len": 64}))
    assert validator(document, {"$ref": f"#/components/schemas/{schema}"}).is_valid(body) == valid


@pytest.mark.parametrize("name", ["static", "api-key"])
def test_every_error_reply_is_documented_in_its_route_dialect(name: str):
    """Each layer's failure, through serving.dialects.error_reply, has its status and body documented."""
    document = build_document(config_of(name))
    checked = 0
    for path, method in operations(document):
        op = document["paths"][path][method.lower()]
        api = api_for_path(path)
        if op["tags"][0] not in ("lmi", "openai", "tgi") or path == "/v1/models":
            continue
        causes = [(code, error_type) for code, error_type, _ in ERROR_CAUSES]
        for code, error_type in causes + ([(401, "Unauthorized")] if name == "api-key" else []):
            status, body = error_reply(api, code, "what went wrong", error_type)
            schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{ERROR_SCHEMAS[api.dialect]}"}
            check(document, schema, body)
            checked += 1
    assert checked == 9 * (len(ERROR_CAUSES) + (name == "api-key"))  # 9 inference operations
    responses = document["paths"]["/v1/completions"]["post"]["responses"]
    assert "429" in responses  # a full queue is a RateLimitError to OpenAI
    assert "424" not in responses
    tgi = document["paths"]["/generate"]["post"]["responses"]
    assert {"422", "424"} <= set(tgi)
    assert "400" not in tgi
    assert error_reply(Api.LMI, 503, "full", "WlmCapacityException")[0] == 503


def test_get_openapi_json_serves_the_document():
    config = config_of("static")
    client = create_app(config, NoBroker()).test_client()  # type: ignore[arg-type]
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == json.loads(json.dumps(build_document(config)))
