"""text-generation: causal LMs, left-padded batches; `return_full_text` prepends the prompt."""

from __future__ import annotations

from engines.hf.loading import LoadedModel
from engines.hf.tasks.generation import Generator


def create_runner(loaded: LoadedModel) -> Generator:
    return Generator(loaded, causal=True)
