"""The CUDA-graph decode path's inputs: static buffers, bucket padding and the padding block.

Graph capture needs a GPU (the cuda-marked test); the buffers, the padding rows and the bucket choice
are the same code eagerly, so on CPU the runner's uncaptured path must give the logits of a plain
forward and leave every sequence's cache as the plain forward leaves it.
"""

from __future__ import annotations

import pytest
import torch
from support import tiny_model_script

from engines.kernels.ops import TorchOps
from engines.llama.batch import ForwardBatch
from engines.llama.weights import load_llama
from engines.rolling.cuda_graphs import DecodeGraphRunner, batch_buckets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0))


def test_buckets_cover_every_batch_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(64)[-3:] == [48, 56, 64]


def _prefilled(model, device, blocks_per_seq: int, prompts: list[list[int]]):
    cache = model.make_cache(len(prompts) * blocks_per_seq + 1, 4)  # the last block pads
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))[::-1] for i in range(len(prompts))]
    model(ForwardBatch.build([(t, p, 0) for t, p in zip(tables, prompts, strict=True)], 4, device), cache)
    return cache, tables


def _decode(model, prompts, tables, tokens):
    return ForwardBatch.build(
        [(t, [tok], len(p)) for t, p, tok in zip(tables, prompts, tokens, strict=True)], 4, "cpu"
    )


@pytest.mark.parametrize("count", [3, 4])
def test_padded_static_batch_matches_a_plain_decode(tiny, count):
    model, _ = load_llama(tiny, torch.float32, "cpu", max_model_len=64, ops=TorchOps)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [11, 12, 13, 14, 15, 16, 17], [2, 9, 4]][:count]
    plain_cache, tables = _prefilled(model, "cpu", 4, prompts)
    graph_cache, _ = _prefilled(model, "cpu", 4, prompts)
    padding = graph_cache.num_blocks - 1
    runner = DecodeGraphRunner(model, graph_cache, max_batch=8, max_model_len=64, padding_block=padding)
    expected = model(_decode(model, prompts, tables, [21, 22, 23, 24][:count]), plain_cache)
    actual = runner.run(_decode(model, prompts, tables, [21, 22, 23, 24][:count]))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for layer in range(len(plain_cache.keys)):  # padding rows wrote only the padding block
        torch.testing.assert_close(graph_cache.keys[layer][:padding], plain_cache.keys[layer][:padding])
        torch.testing.assert_close(graph_cache.values[layer][:padding], plain_cache.values[layer][:padding])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_matches_eager_on_cuda(tiny):
    from engines.kernels.ops import select_ops

    ops = select_ops("auto", "cuda", (4, 2, 16))
    model, _ = load_llama(tiny, torch.float32, "cuda", max_model_len=64, ops=ops)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [11, 12, 13, 14, 15, 16, 17]]
    eager_cache, tables = _prefilled(model, "cuda", 4, prompts)
    graph_cache, _ = _prefilled(model, "cuda", 4, prompts)
    runner = DecodeGraphRunner(model, graph_cache, 8, 64, graph_cache.num_blocks - 1)
    runner.capture()
    for step, tokens in enumerate([[21, 22, 23], [31, 32, 33]]):
        batch = ForwardBatch.build(
            [(t, [tok], len(p) + step) for t, p, tok in zip(tables, prompts, tokens, strict=True)], 4, "cuda"
        )
        torch.testing.assert_close(runner.run(batch), model(batch, eager_cache), rtol=1e-4, atol=1e-4)
