"""HandlerService: explicit initialise-once / handle-per-batch lifecycle around any handler style.

DJL's "an empty Input means initialise" convention is honoured only here, at the edge: user
``handle(inputs)`` functions get that warm-up call, and nothing else in the project relies on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from handlers import loader
from handlers.batch_io import make_batch, split_batch_output
from handlers.builtin.generation import GenerationHandler
from handlers.djl_api import Input, Output
from handlers.sagemaker import SageMakerHandler, is_sagemaker_module

log = logging.getLogger("handlers.service")

OOM_MARKERS = ("out of memory", "no available memory for the cache blocks")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return any(marker in str(exc).lower() for marker in OOM_MARKERS)


def error_output(exc: BaseException) -> Output:
    """Exceptions become DJL's 424 body; out-of-memory becomes 507 so clients can back off."""
    if is_out_of_memory(exc):
        return Output().error(str(exc) or type(exc).__name__, code=507, message="out of memory")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return Output().error(str(exc), code=status, message=type(exc).__name__)
    return Output().error(str(exc) or type(exc).__name__)


class HandlerService:
    """Loads the entry point once and turns a batch of Inputs into one Output per Input."""

    def __init__(
        self, properties: dict[str, str], model_dir: str | None, settings: dict[str, Any] | None = None
    ) -> None:
        self.properties = properties
        self.model_dir = model_dir
        self.settings = settings
        """Typed values of every declared key (serving/options.py), for the built-in handler."""
        self._handle: Callable[[Input], Any] | None = None
        self._handle_batch: Callable[[list[Input]], list[Output]] | None = None
        self.generation_handler: GenerationHandler | None = None
        """Set when the handler serves requests one by one through a generation engine."""

    def initialize(self) -> None:
        from handlers.artifacts import localize_model

        self.properties = localize_model(self.properties, self.model_dir, self.settings)
        entry = loader.resolve_entry_point(self.model_dir, self.properties)
        log.info("Loading entry point %s", entry)
        module = loader.load_entry_point(entry)
        name = self.properties.get("handler", "handle")
        if callable(getattr(module, "create_handler", None)):
            handler = self._create_handler(module)
            if isinstance(handler, GenerationHandler):
                self.generation_handler = handler
            else:
                self._handle_batch = handler.handle_batch
        elif callable(getattr(module, name, None)):
            self._handle = getattr(module, name)
            self._warm_up()
        elif is_sagemaker_module(module):
            self._handle = SageMakerHandler(module, self.model_dir).handle
        elif entry != loader.BUILTIN_ENTRY_POINT and loader.has_builtin_model(
            self.model_dir, self.properties
        ):
            log.warning(
                "%s defines no %s(inputs); falling back to the built-in handler (as DJL)", entry, name
            )
            handler = self._create_handler(loader.load_entry_point(loader.BUILTIN_ENTRY_POINT))
            if isinstance(handler, GenerationHandler):
                self.generation_handler = handler
            else:
                self._handle_batch = handler.handle_batch
        else:
            raise loader.HandlerLoadError(
                f"{entry} defines neither {name}(inputs) nor SageMaker-style model_fn/transform_fn. "
                "Fix: add `def handle(inputs: Input) -> Output` "
                "(see properties_examples/custom-handler/model.py)."
            )

    def _create_handler(self, module: Any) -> Any:
        """The built-in handler also gets the typed settings; a user's create_handler gets properties."""
        if module.__name__ == loader.BUILTIN_ENTRY_POINT:
            return module.create_handler(self.properties, self.settings)
        return module.create_handler(self.properties)

    def _warm_up(self) -> None:
        """DJL's initialisation call: an empty Input carrying the init properties; >= 300 fails the load."""
        assert self._handle is not None
        warmup = Input()
        warmup.properties.update(self.properties)
        warmup.properties.setdefault("handler", self.properties.get("handler", "handle"))
        result = self._handle(warmup)
        if isinstance(result, Output) and result.code >= 300:
            body = result.content.get("data")
            detail = body.decode(errors="replace") if isinstance(body, bytes) else result.message
            raise loader.HandlerLoadError(f"The initialisation call returned {result.code}: {detail}")

    def handle_batch(self, inputs: list[Input]) -> list[Output]:
        """One Output per Input, whatever the handler does (raise, return None, miscount)."""
        if self._handle_batch is None:
            return self._handle_djl(inputs)
        try:
            outputs = self._handle_batch(inputs)
        except Exception as exc:  # the worker boundary: classify, never crash
            log.exception("Handler failed")
            return [error_output(exc) for _ in inputs]
        if len(outputs) != len(inputs):
            message = f"Batch output size mismatch, expected: {len(inputs)}, actual: {len(outputs)}"
            return [Output().error(message, code=500, message="handler bug") for _ in inputs]
        return outputs

    def _handle_djl(self, inputs: list[Input]) -> list[Output]:
        assert self._handle is not None, "initialize() must run before handle_batch()"
        batched = make_batch(inputs)
        try:
            result = self._handle(batched)
        except Exception as exc:  # the worker boundary: classify, never crash
            log.exception("Handler failed")
            return [error_output(exc) for _ in inputs]
        if result is None:
            return [Output(code=204, message="No content") for _ in inputs]
        if not isinstance(result, Output):
            message = f"Invalid output type: {type(result).__name__}; handle() must return Output or None"
            return [Output().error(message) for _ in inputs]
        try:
            outputs = split_batch_output(result, len(inputs))
        except ValueError as exc:
            return [Output().error(str(exc), code=400, message="Bad request") for _ in inputs]
        if outputs[-1] is not result and result.finalize_function is not None:
            outputs[-1].finalize(result.finalize_function, *result.finalize_args)  # once, after the last
        return outputs
