"""Every shipped example must load through the real config loader without errors or unknown keys."""

from __future__ import annotations

import logging

import pytest
from support import ROOT

from serving.config import load_config

EXAMPLES = sorted(p.parent for p in (ROOT / "properties_examples").glob("*/serving.properties"))


def test_examples_cover_the_documented_modes():
    names = {p.name for p in EXAMPLES}
    assert {"default-model", "flan-t5", "embeddings", "custom-handler", "dynamic-batching"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_properties_load_cleanly(example, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.config"):
        config = load_config(str(example), environ={})
    assert not [r for r in caplog.records if "Unknown property" in r.getMessage()]
    assert config.model_dir == str(example)
    assert config.options or config.model_properties


def test_dynamic_batching_example_values():
    config = load_config(str(ROOT / "properties_examples" / "dynamic-batching"), environ={})
    assert (config.batch_size, config.max_batch_delay_ms, config.job_queue_size) == (8, 20, 256)
