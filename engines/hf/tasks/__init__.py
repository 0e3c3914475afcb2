"""HF tasks: which transformers Auto class loads the model, and which module serves the requests.

Runner modules are imported only when their task is chosen, so one task's dependencies never
slow down or break another's. The generation tasks have no runner here: their Auto class loads the
model for the generation engines (engines.GENERATION_ENGINES), which serve them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engines.base import EngineLoadError, TaskRequest
from engines.registry import Registry

if TYPE_CHECKING:
    from engines.hf.loading import LoadedModel


class TaskRunner(Protocol):
    """Serves one task for a loaded model and tokenizer."""

    def run(self, requests: list[TaskRequest]) -> list[list[Any]]: ...


@dataclass(frozen=True)
class TaskSpec:
    auto_class: str
    """Name of the transformers Auto class that loads a model for this task."""
    module: str | None = None
    """Module providing `create_runner(loaded: LoadedModel) -> TaskRunner`; None when the task engine
    does not serve the task (text generation, served by the generation engines)."""

    def create_runner(self, loaded: LoadedModel) -> TaskRunner:
        if self.module is None:
            from engines import GENERATION_ENGINES

            raise EngineLoadError(
                f"The task engine does not serve {loaded.task!r}: generation tasks are served by the "
                f"generation engines (engines.GENERATION_ENGINES: {', '.join(GENERATION_ENGINES.names())}) "
                "through handlers.builtin.generation.GenerationHandler; use create_generation_engine."
            )
        return importlib.import_module(self.module).create_runner(loaded)


TASKS = Registry[TaskSpec]("task")
TASKS.register("text-generation")(TaskSpec("AutoModelForCausalLM"))
TASKS.register("text2text-generation")(TaskSpec("AutoModelForSeq2SeqLM"))
TASKS.register("feature-extraction")(TaskSpec("AutoModel", "engines.hf.tasks.feature_extraction"))
TASKS.register("text-classification")(
    TaskSpec("AutoModelForSequenceClassification", "engines.hf.tasks.text_classification")
)
TASKS.register("fill-mask")(TaskSpec("AutoModelForMaskedLM", "engines.hf.tasks.fill_mask"))

TASK_ALIASES = {
    "text-embedding": "feature-extraction",
    "embedding": "feature-extraction",
    "sentiment-analysis": "text-classification",
}


def canonical_task(name: str) -> str:
    """The registered name for `name`, resolving aliases such as "embedding"."""
    name = name.strip().lower()
    return TASK_ALIASES.get(name, name)


def get_task(name: str) -> TaskSpec:
    """The spec for `name` (aliases allowed); unknown tasks raise EngineLoadError listing the supported."""
    try:
        return TASKS.get(canonical_task(name))
    except KeyError as error:
        raise EngineLoadError(f"option.task: {error.args[0]}") from None
