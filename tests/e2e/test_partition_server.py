"""Partitioned checkpoints through the real server: tensor_parallel_degree=2 from a partition (a local
folder, SeaweedFS via option.model_id=s3://..., or one written at start-up by
option.save_mp_checkpoint_path) gives the greedy tokens of the unpartitioned model served by one rank,
and a server whose degrees differ from the partition's fails start-up saying so."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, tiny_model_script

from engines.parallel.partition import Manifest, write_partition
from scripts.seaweedfs import SeaweedS3

PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog and then", "a", "one two three four"]
NEW_TOKENS = 12
ENV = {
    "OPTION_MAX_ROLLING_BATCH_SIZE": "4",
    "OPTION_MAX_MODEL_LEN": "128",
    "OPTION_DTYPE": "fp32",
}


def _stream_ids(srv: ServerProcess, prompt: str) -> list[int]:
    parameters = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    body = {"inputs": prompt, "parameters": parameters, "stream": True}
    with srv.post(json_body=body, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        return [json.loads(line)["token"]["id"] for line in resp.iter_lines() if line]


def _greedy(model_dir: Path, env: dict[str, str]) -> tuple[list[list[int]], str]:
    """Every prompt at once (they share steps) on a server started for this call; and its log."""
    with ServerProcess(model_dir, {**ENV, **env}) as srv:
        srv.wait_ready(timeout_s=120)
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(lambda prompt: _stream_ids(srv, prompt), PROMPTS)), srv.output()


TWO_RANKS = "2 ranks (tensor_parallel_degree=2, pipeline_parallel_degree=1)"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


@pytest.fixture(scope="module")
def expected(source) -> list[list[int]]:
    ids, log = _greedy(source, {"OPTION_TENSOR_PARALLEL_DEGREE": "1"})
    assert "1 rank," in log
    assert all(ids)
    assert len({tuple(each) for each in ids}) == len(PROMPTS)  # distinct outputs: a comparison worth making
    return ids


@pytest.fixture(scope="module")
def partition(source, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tp2")
    write_partition(source, folder, 2, 1, "fp32")
    return folder


def test_a_local_partition_served_by_two_ranks_matches_one_rank(partition, expected):
    ids, log = _greedy(partition, {"OPTION_TENSOR_PARALLEL_DEGREE": "2"})
    assert ids == expected
    assert TWO_RANKS in log


def test_a_partition_cut_from_s3_and_served_from_s3_matches_one_rank(source, expected, tmp_path):
    with SeaweedS3(tmp_path / "seaweed") as s3:
        s3.upload_folder(source, "models", "tiny")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "AWS_"))}
        env = {**s3.env(), "SERVING_DOWNLOAD_DIR": str(tmp_path / "downloads")}
        cut = tmp_path / "cut"
        argv = ["partition", "--model-dir", "s3://models/tiny/", "--tensor-parallel-degree", "2"]
        result = subprocess.run(
            [sys.executable, "-m", "serving", *argv, "--dtype", "fp32", "--output", str(cut)],
            env={**clean, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Partitioned s3://models/tiny/ for tensor_parallel_degree=2" in result.stdout
        assert Manifest.read(cut).source == "s3://models/tiny/"
        s3.upload_folder(cut, "models", "tiny-tp2")
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        (model_dir / "serving.properties").write_text(
            "option.model_id=s3://models/tiny-tp2/\noption.tensor_parallel_degree=2\n"
        )
        ids, log = _greedy(model_dir, env)
    assert ids == expected
    assert TWO_RANKS in log


def test_one_rank_on_a_two_rank_partition_fails_start_up_naming_both(partition):
    with ServerProcess(partition, {**ENV, "OPTION_TENSOR_PARALLEL_DEGREE": "1"}) as srv:
        status = srv.wait_ready(timeout_s=120, expect=500).json()[partition.name]
        answer = srv.post(json_body={"inputs": "hi"})
    assert status["status"] == "FAILED"
    assert "is partitioned for tensor_parallel_degree=2, pipeline_parallel_degree=1" in status["reason"]
    assert "but this server runs tensor_parallel_degree=1" in status["reason"]
    assert answer.status_code == 503
    assert "is partitioned for tensor_parallel_degree=2" in answer.json()["message"]


def test_save_mp_checkpoint_path_partitions_at_start_up_and_serves_it(source, expected, tmp_path):
    target = tmp_path / "saved"
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_SAVE_MP_CHECKPOINT_PATH": str(target)}
    ids, log = _greedy(source, env)
    assert ids == expected
    assert TWO_RANKS in log
    assert f"into 2 ranks under {target}" in log
    manifest = Manifest.read(target)
    degrees = (manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree)
    assert (*degrees, manifest.dtype) == (2, 1, "float32")
    assert sorted(p.name for p in target.glob("rank-*")) == [f.file for f in manifest.files]
