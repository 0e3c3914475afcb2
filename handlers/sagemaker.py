"""Adapter for SageMaker inference-toolkit style modules (model_fn/input_fn/predict_fn/output_fn)."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

from handlers.djl_api import Input, Output

SAGEMAKER_FUNCTIONS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")


def is_sagemaker_module(module: ModuleType) -> bool:
    return any(callable(getattr(module, name, None)) for name in SAGEMAKER_FUNCTIONS)


def _default_input_fn(body: bytes, content_type: str) -> Any:
    if content_type.startswith("application/json"):
        return json.loads(body)
    if content_type.startswith("text/"):
        return body.decode("utf-8")
    return body


def _default_output_fn(prediction: Any, accept: str) -> Any:
    if isinstance(prediction, (bytes, str)):
        return prediction
    if hasattr(prediction, "tolist"):
        prediction = prediction.tolist()
    return json.dumps(prediction)


def _default_predict_fn(data: Any, model: Any) -> Any:
    return model(data)


class SageMakerHandler:
    """Runs model_fn once, then input_fn → predict_fn → output_fn (or transform_fn) per request."""

    def __init__(self, module: ModuleType, model_dir: str | None) -> None:
        self.transform_fn: Callable | None = getattr(module, "transform_fn", None)
        self.input_fn = getattr(module, "input_fn", _default_input_fn)
        self.predict_fn = getattr(module, "predict_fn", _default_predict_fn)
        self.output_fn = getattr(module, "output_fn", _default_output_fn)
        custom = [n for n in ("input_fn", "predict_fn", "output_fn") if hasattr(module, n)]
        if self.transform_fn and custom:
            raise ValueError(
                f"Cannot use transform_fn together with {', '.join(custom)}: define either transform_fn "
                "alone or any of input_fn/predict_fn/output_fn."
            )
        model_fn = getattr(module, "model_fn", None)
        if model_fn is None:
            raise ValueError("A SageMaker-style module must define model_fn(model_dir) to load the model.")
        self.model = model_fn(model_dir)

    def _one(self, item: Input) -> tuple[bytes | str, str]:
        content_type = item.get_property("Content-Type") or "application/json"
        accept = item.get_property("Accept") or "application/json"
        if accept == "*/*":
            accept = "application/json"
        body = item.get_as_bytes() or b""
        if self.transform_fn is not None:
            result = self.transform_fn(self.model, body, content_type, accept)
        else:
            data = self.input_fn(body, content_type)
            result = self.output_fn(self.predict_fn(data, self.model), accept)
        if isinstance(result, tuple):
            return result[0], result[1]
        return result, accept

    def handle(self, inputs: Input) -> Output | None:
        if inputs.is_empty():
            return None
        output = Output()
        batches = inputs.get_batches()
        for index, item in enumerate(batches):
            body, content_type = self._one(item)
            output.add(body, key="data", batch_index=index if len(batches) > 1 else None)
            if len(batches) == 1:
                output.add_property("Content-Type", content_type)
            else:
                output.add_property(f"batch_{index}_Content-Type", content_type)
        return output
