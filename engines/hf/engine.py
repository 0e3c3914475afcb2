"""HfEngine: the `Engine` protocol over a transformers model and a task runner."""

from __future__ import annotations

import logging
import time
from typing import Any

from engines.base import EngineConfig, TaskRequest
from engines.hf.loading import load
from engines.hf.tasks import get_task

logger = logging.getLogger("engines.hf")


class HfEngine:
    """Loads the tokenizer, model and task runner once; `run` serves batches of requests."""

    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        loaded = load(config)
        self.config = config
        self.task: str = loaded.task
        self.model: Any = loaded.model
        self.tokenizer: Any = loaded.tokenizer
        self._runner = get_task(loaded.task).create_runner(loaded)
        logger.info(
            "Loaded %s (%s) for %s in %s on %s in %.1f s",
            loaded.checkpoint.describe(),
            type(self.model).__name__,
            self.task,
            loaded.dtype,
            config.device,
            time.perf_counter() - started,
        )

    def run(self, requests: list[TaskRequest]) -> list[list[Any]]:
        """Per request, one JSON-able result per input; invalid parameters raise RequestError."""
        if not requests:
            return []
        return self._runner.run(requests)
