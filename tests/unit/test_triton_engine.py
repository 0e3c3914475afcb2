"""The whole native engine on the Triton kernels (the GPU path), run by Triton's interpreter on CPU.

Each kernel is tested against its reference in test_triton_kernels.py; this runs them together through
the engine (packed chunked prefill, prefix-cache hits, decode with splits, n forks) and compares the
greedy tokens with the plain-torch ops on the same tiny fp32 model.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
pytest.importorskip("triton")

from support import tiny_model_script  # noqa: E402

from engines.base import EngineConfig  # noqa: E402
from engines.rolling.factory import create_rolling_engine  # noqa: E402
from engines.types import GenerationRequest, SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0))


def _run(engine, requests: list[GenerationRequest]) -> dict[tuple[str, int], list[int]]:
    tokens: dict[tuple[str, int], list[int]] = {}
    admit = requests
    for _ in range(200):
        for event in engine.step(admit, []):
            assert event.finish_reason != "error", event.error
            tokens.setdefault((event.request_id, event.index), []).append(event.token_id)
        admit = []
        if not engine.running:
            return tokens
    raise AssertionError("the engine did not finish")


def test_triton_engine_matches_the_torch_ops(tiny):
    fields = {"model_path": tiny, "dtype": "fp32", "device": DEVICE, "max_model_len": 96}
    fields |= {"max_rolling_batch_size": 4, "max_rolling_batch_prefill_tokens": 24, "block_size": 8}
    triton_engine = create_rolling_engine(EngineConfig(kernels="triton", **fields))
    torch_engine = create_rolling_engine(EngineConfig(kernels="torch", **fields))
    assert triton_engine.model.layers[0].ops.name == "triton"
    shared = list(range(5, 45))  # 40 tokens: split over two steps by the 24-token budget
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = [
        GenerationRequest("long", shared + [7, 8], params),
        GenerationRequest("short", [3, 4, 5], params),
        GenerationRequest(
            "forks", [9, 10, 11, 12, 13], SamplingParams(max_new_tokens=4, n=2, ignore_eos=True)
        ),
    ]
    second = [GenerationRequest("hit", shared + [9], params)]  # finds the first 40 tokens cached
    for requests in (first, second):
        assert _run(triton_engine, requests) == _run(torch_engine, requests)
    assert triton_engine.stats().prefix_hit_tokens >= 32
