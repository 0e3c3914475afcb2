"""text2text-generation: encoder-decoder models (T5, BART); outputs never contain the input."""

from __future__ import annotations

from engines.hf.loading import LoadedModel
from engines.hf.tasks.generation import Generator


def create_runner(loaded: LoadedModel) -> Generator:
    return Generator(loaded, causal=False)
