"""Tensor / pipeline parallel groups through the real server: outputs equal to one process (default
model and a tiny Llama across two "nodes" on loopback), a rank killed mid-request, a bad degree.

Each parallel server's model worker is rank 0 of a gloo group whose other ranks are follower processes
forked from its fork server (engines.parallel.spawn; on node 1: started by ``lmi serve --node-rank 1``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, free_port, tiny_mistral, tiny_model_script, tiny_qwen2

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
SMALL = {"OPTION_MAX_ROLLING_BATCH_SIZE": "4", "OPTION_MAX_MODEL_LEN": "256", "OPTION_DTYPE": "fp32"}


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        try:
            out.append(
                (child, (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            )
        except OSError:
            continue
        stack.extend(children.get(child, []))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def followers(srv_pid: int) -> list[int]:
    """The follower ranks below ``srv_pid``: forked from the fork server, each names itself lmi-rankN."""
    ranks = []
    for pid, _ in descendants(srv_pid):
        try:
            if (Path("/proc") / str(pid) / "comm").read_text().startswith("lmi-rank"):
                ranks.append(pid)
        except OSError:
            continue
    return ranks


def generate_all(srv: ServerProcess, max_new_tokens: int = 16) -> dict[str, str]:
    """Greedy completions of PROMPTS sent concurrently, staggered so that later ones join a running batch."""
    out: dict[str, str] = {}

    def one(prompt: str) -> None:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False}}
        resp = srv.post(json_body=body)
        assert resp.status_code == 200, resp.text
        out[prompt] = resp.json()["generated_text"]

    threads = []
    for prompt in PROMPTS:
        thread = threading.Thread(target=one, args=(prompt,))
        thread.start()
        threads.append(thread)
        time.sleep(0.15)
    for thread in threads:
        thread.join(timeout=120)
    assert set(out) == set(PROMPTS)
    return out


@pytest.fixture(scope="module")
def default_reference() -> dict[str, str]:
    with ServerProcess(None, SMALL) as srv:
        srv.wait_ready(timeout_s=180)
        return generate_all(srv)


def test_default_model_at_tp2_equals_one_process_then_survives_a_killed_rank(default_reference):
    env = {**SMALL, "OPTION_TENSOR_PARALLEL_DEGREE": "2"}
    with ServerProcess(None, env) as srv:
        srv.wait_ready(timeout_s=180)
        ranks = followers(srv.proc.pid)
        assert len(ranks) == 1, srv.output()
        assert generate_all(srv) == default_reference

        result: dict[str, object] = {}

        def long_request() -> None:
            body = {
                "inputs": "Tell me a long story",
                "parameters": {"max_new_tokens": 240, "ignore_eos": True},
            }
            resp = srv.post(json_body=body)
            result["status"], result["body"] = resp.status_code, resp.text

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.5)  # the request is decoding
        os.kill(ranks[0], signal.SIGKILL)
        thread.join(timeout=60)
        assert result["status"] >= 500, result
        assert "died" in str(result["body"]) or "exited" in str(result["body"]), result
        srv.wait_ready(timeout_s=120)  # the group restarted as a whole
        new_ranks = followers(srv.proc.pid)
        assert len(new_ranks) == 1
        assert new_ranks != ranks
        assert generate_all(srv) == default_reference
        assert "Parallel group broken" in srv.output()

        # Rank 0 (the model worker) killed: its fork server and its follower go with it, none is left.
        worker = next(pid for pid, cmd in descendants(srv.proc.pid) if "handlers.worker" in cmd)
        servers = [pid for pid, cmd in descendants(worker) if "forkserver" in cmd and pid not in new_ranks]
        assert len(servers) == 1
        assert followers(worker) == new_ranks  # the ranks are the fork server's children
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in servers + new_ranks):
            time.sleep(0.2)
        assert not any(alive(pid) for pid in servers + new_ranks)
        srv.wait_ready(timeout_s=120)
        assert generate_all(srv) == default_reference


def test_pipeline_stages_of_the_default_model_equal_one_process(default_reference):
    with ServerProcess(None, {**SMALL, "OPTION_PIPELINE_PARALLEL_DEGREE": "2"}) as srv:
        srv.wait_ready(timeout_s=180)
        assert generate_all(srv) == default_reference


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


def test_a_degree_that_does_not_fit_fails_start_up_before_any_rank_starts(tiny_llama):
    started = time.monotonic()
    with ServerProcess(tiny_llama, {**SMALL, "TENSOR_PARALLEL_DEGREE": "3"}) as srv:
        failed = srv.wait_ready(expect=500, timeout_s=60)
        assert failed.status_code == 500
        assert time.monotonic() - started < 60
        log = srv.output()
        assert "num_key_value_heads=2 is fewer than tensor_parallel_degree=3" in log
        assert "Started follower ranks" not in log


def test_two_nodes_on_loopback_equal_one_process(tiny_llama):
    with ServerProcess(tiny_llama, SMALL) as srv:
        srv.wait_ready(timeout_s=120)
        reference = generate_all(srv)
    cluster = {
        **SMALL,
        "OPTION_TENSOR_PARALLEL_DEGREE": "2",
        "OPTION_PIPELINE_PARALLEL_DEGREE": "2",
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_"))}
    env.update(cluster, PYTHONPATH=str(ROOT))
    node1_log = Path(tiny_llama) / "node1.log"
    node1_ranks: list[int] = []
    with node1_log.open("w") as log:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "serving", "serve", "--model-dir", str(tiny_llama), "--node-rank", "1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with ServerProcess(tiny_llama, cluster) as srv:
            srv.wait_ready(timeout_s=120)
            assert generate_all(srv) == reference
            assert len(followers(srv.proc.pid)) == 1  # rank 1 here; ranks 2 and 3 on node 1
            node1_ranks = followers(node1.pid)
            assert len(node1_ranks) == 2, node1_log.read_text()[-3000:]
            assert "Rank 3/4 joined" in node1_log.read_text()
            assert "/ping" not in node1_log.read_text()  # node 1 serves no HTTP
    finally:
        node1.send_signal(signal.SIGTERM)
        try:
            node1.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node1.kill()
            node1.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in node1_ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in node1_ranks if alive(pid)]  # node 1's ranks went with it


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_at_tp2_pp2_equal_one_process(kind, tmp_path):
    path = (tiny_qwen2 if kind == "qwen2" else tiny_mistral)(tmp_path / kind)
    with ServerProcess(path, SMALL) as srv:
        srv.wait_ready(timeout_s=120)
        reference = generate_all(srv)
    layout = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_PIPELINE_PARALLEL_DEGREE": "2"}
    with ServerProcess(path, {**SMALL, **layout}) as srv:
        srv.wait_ready(timeout_s=120)
        assert generate_all(srv) == reference
        assert len(followers(srv.proc.pid)) == 3
    assert len(set(reference.values())) == len(PROMPTS)  # the random model does tell the prompts apart
