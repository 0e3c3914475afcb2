"""Tensor and pipeline parallelism against one process: the same tokens, event for event.

Each parallel engine is a real group: rank 0 in this process, the other ranks as
engines.parallel.follower processes joined over gloo. Tiny seeded random Llama (4 heads, 2 KV heads:
KV heads split), Qwen2 (q/k/v biases, tied embeddings, 1 KV head: replicated) and Mistral models in
fp32 run a workload with requests joining a running batch, chunked prompts, n=2 forks (a block copy on
every rank), prompt log-probabilities (chosen rows) and top alternatives.
"""

from __future__ import annotations

import os

import pytest
import torch
from support import tiny_mistral, tiny_model_script, tiny_qwen2

from engines.base import EngineConfig, EngineLoadError
from engines.rolling.factory import create_rolling_engine
from engines.types import GenerationRequest, SamplingParams

LAYOUTS = [(2, 1), (1, 2), (2, 2)]
"""(tensor_parallel_degree, pipeline_parallel_degree) compared with (1, 1)."""


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def model_path(request, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return str(tiny_model_script().make_tiny_model("llama", dest, seed=0))
    return str(tiny_qwen2(dest) if request.param == "qwen2" else tiny_mistral(dest))


def engine_for(path: str, tp: int, pp: int, **fields):
    config = EngineConfig(
        model_path=path, dtype="fp32", kernels="torch", max_model_len=96, max_rolling_batch_size=6,
        block_size=16, max_rolling_batch_prefill_tokens=24, tensor_parallel_degree=tp,
        pipeline_parallel_degree=pp, **fields,
    )  # fmt: skip
    return create_rolling_engine(config)


def workload() -> dict[int, list[GenerationRequest]]:
    greedy = SamplingParams(max_new_tokens=14, ignore_eos=True, top_logprobs=2)
    return {
        0: [
            GenerationRequest("long", list(range(3, 60)), greedy),  # 57 tokens: three prefill chunks
            GenerationRequest("short", [5, 6, 7], SamplingParams(max_new_tokens=10, ignore_eos=True)),
        ],
        3: [
            GenerationRequest("forked", list(range(60, 81)), SamplingParams(max_new_tokens=8, n=2)),
            GenerationRequest(
                "scored", list(range(90, 110)), SamplingParams(max_new_tokens=6, prompt_logprobs=True)
            ),
        ],
        7: [GenerationRequest("late", [11, 12, 13, 14], SamplingParams(max_new_tokens=9, ignore_eos=True))],
    }


def run(engine) -> dict[tuple[str, int], list[tuple]]:
    """Every completion's events, driving the engine until idle."""
    schedule, events, call = workload(), [], 0
    while call <= max(schedule) or engine.running:
        events += engine.step(schedule.get(call, []), [])
        call += 1
        assert call < 300, "the engine never went idle"
    out: dict[tuple[str, int], list[tuple]] = {}
    for e in events:
        prompt = tuple(lp for _, _, lp in e.prompt_tokens if lp is not None)
        row = (e.token_id, e.finish_reason, tuple(t for t, _ in e.top_logprobs), e.logprob, prompt)
        out.setdefault((e.request_id, e.index), []).append(row)
    return out


def same_events(got: list[tuple], expected: list[tuple]) -> bool:
    """Tokens, finish reasons and top-logprob ids equal; logprobs within 1e-3 (sharding sums in
    another order: fp32 differences of ~1e-6 flipped a rounding to 3 decimals)."""
    if len(got) != len(expected):
        return False
    for (*ids, logprob, prompt), (*want_ids, want_logprob, want_prompt) in zip(got, expected, strict=True):
        if ids != want_ids or len(prompt) != len(want_prompt):
            return False
        values, wanted = [logprob, *prompt], [want_logprob, *want_prompt]
        if values != pytest.approx(wanted, abs=1e-3):
            return False
    return True


@pytest.fixture(scope="module")
def reference(model_path):
    engine = engine_for(model_path, 1, 1)
    try:
        return run(engine)
    finally:
        engine.close()


@pytest.mark.parametrize(("tp", "pp"), LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_parallel_group_matches_one_process(model_path, reference, tp, pp):
    engine = engine_for(model_path, tp, pp)
    try:
        assert engine.group is not None
        assert engine.model.plan.layout.world_size == tp * pp
        got = run(engine)
    finally:
        engine.close()
    assert set(got) == set(reference)
    assert sum(len(v) for v in reference.values()) > 50  # the workload really generated
    for key, events in reference.items():
        assert same_events(got[key], events), (key, got[key], events)


def test_degree_not_dividing_the_heads_fails_before_any_rank_starts(tmp_path):
    path = str(tiny_model_script().make_tiny_model("llama", tmp_path, seed=0))
    heads = r"num_key_value_heads=2 is fewer than tensor_parallel_degree=3 and does not divide it"
    with pytest.raises(EngineLoadError, match=heads):
        engine_for(path, 3, 1)
    layers = r"num_hidden_layers=2 is fewer than pipeline_parallel_degree=3"
    with pytest.raises(EngineLoadError, match=layers):
        engine_for(path, 1, 3)


def test_a_follower_is_forked_by_the_fork_server_in_the_starters_folder(tmp_path, monkeypatch):
    """Ranks come from the fork server (no imports of their own), named lmi-rankN, in this process's
    folder as of the start (not the fork server's, which began earlier)."""
    import os
    from pathlib import Path

    from engines.parallel.spawn import prestart

    path = str(tiny_model_script().make_tiny_model("llama", tmp_path / "model", seed=0))
    prestart()
    monkeypatch.chdir(tmp_path)
    engine = engine_for(path, 2, 1)
    try:
        (rank,) = engine.group.followers.processes
        proc = Path(f"/proc/{rank.pid}")
        assert (proc / "comm").read_text().strip() == "lmi-rank1"
        assert os.readlink(proc / "cwd") == str(tmp_path)
        parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        assert parent != os.getpid()  # forked by the server, not by this process
        assert "forkserver" in (Path(f"/proc/{parent}") / "cmdline").read_text()
        assert run(engine)  # and it computes its half
    finally:
        engine.close()
    assert rank.poll() == 0  # stopped cleanly on close


RANK_LOG_SCRIPT = """
import os, sys
from engines.parallel.spawn import prestart
prestart()  # the fork server's environment is this one, without the level set below
if sys.argv[2]:
    os.environ["SERVING_LOG_LEVEL"] = sys.argv[2]
from engines.base import EngineConfig
from engines.rolling.factory import create_rolling_engine
config = EngineConfig(model_path=sys.argv[1], dtype="fp32", kernels="torch", max_model_len=64,
                      max_rolling_batch_size=2, block_size=16, tensor_parallel_degree=2)
create_rolling_engine(config).close()
"""


@pytest.mark.parametrize("level", ["", "error"], ids=["default-level", "set-after-the-fork-server"])
def test_a_rank_runs_with_the_starters_environment_of_the_moment_it_starts(tmp_path, level):
    """The fork server's environment is that of its start; a rank takes the starter's as of the rank's
    start (here SERVING_LOG_LEVEL, which the follower reads: its INFO lines come or go with it)."""
    import subprocess
    import sys

    from support import ROOT

    path = str(tiny_model_script().make_tiny_model("llama", tmp_path, seed=0))
    env = {k: v for k, v in os.environ.items() if k != "SERVING_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", RANK_LOG_SCRIPT, path, level],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("rank1 INFO" in done.stderr) == (level == ""), done.stderr[-3000:]


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_collectives_in_a_group_of_one_equal_the_plain_model(tmp_path, device):
    """Every collective of the model's forward and rank 0's step broadcast run (NCCL on a GPU, gloo on
    the CPU, in a group of one, forced), and the logits equal the model's without any group."""
    import torch.distributed as dist
    from support import free_port

    from engines.llama.batch import ForwardBatch
    from engines.llama.weights import load_llama
    from engines.parallel.comm import Rendezvous, init_comm
    from engines.parallel.group import LeaderModel
    from engines.parallel.layout import ParallelLayout

    path = str(tiny_model_script().make_tiny_model("llama", tmp_path, seed=0))
    plain, _ = load_llama(path, torch.float32, device, max_model_len=64)
    comm = init_comm(ParallelLayout(), Rendezvous("127.0.0.1", free_port()), torch.device(device), force=True)
    try:
        assert dist.get_backend() == ("nccl" if device == "cuda" else "gloo")
        grouped, _ = load_llama(path, torch.float32, device, max_model_len=64, comm=comm)
        leader = LeaderModel(grouped, comm)
        inputs = [([0, 1], list(range(5, 25)), 0), ([2], [7, 8, 9], 0)]
        got = leader(ForwardBatch.build(inputs, 16, device), grouped.make_cache(4, 16))
        want = plain(ForwardBatch.build(inputs, 16, device), plain.make_cache(4, 16))
        torch.testing.assert_close(got, want)
        assert comm.reduce_seconds > 0  # the all-reduces ran
    finally:
        dist.destroy_process_group()


def test_max_degree_on_a_cpu_is_one_rank(tmp_path):
    path = str(tiny_model_script().make_tiny_model("llama", tmp_path, seed=0))
    engine = engine_for(path, 0, 1)  # option.tensor_parallel_degree=max: every visible GPU, none here
    try:
        assert engine.group is None
        assert engine.model.plan.layout.world_size == 1
    finally:
        engine.close()


def test_rank_0_listens_for_the_group_before_it_loads(tmp_path, monkeypatch):
    """A follower that finishes loading first finds rank 0's store already up: connecting while rank 0
    still loads succeeds at once (before this, nothing listened until rank 0 joined, and the follower
    sat 0.5 s in torch's connect back-off)."""
    import datetime

    import torch.distributed as dist
    from support import free_port

    from engines.llama import weights
    from engines.rolling.factory import load_rank

    port = free_port()
    connected = []

    def connect_while_loading(*args, **kwargs):
        store = dist.TCPStore(
            "127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=3),
            wait_for_workers=False,
        )  # fmt: skip
        store.set("follower", "loaded")
        connected.append(store.get("follower"))
        raise EngineLoadError("stopped after the check")

    monkeypatch.setattr(weights, "load_llama", connect_while_loading)
    path = str(tiny_model_script().make_tiny_model("llama", tmp_path, seed=0))
    config = EngineConfig(
        model_path=path, dtype="fp32", kernels="torch", max_model_len=64, tensor_parallel_degree=2,
        master_addr="127.0.0.1", master_port=port,
    )  # fmt: skip
    with pytest.raises(EngineLoadError, match="stopped after the check"):
        load_rank(config, 0, threads=1)
    assert connected == [b"loaded"]
