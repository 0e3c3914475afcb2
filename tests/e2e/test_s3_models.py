"""Models from a real S3-compatible server (SeaweedFS) through s5cmd, boto3, `lmi pull` and `lmi serve`.

Nothing about S3 is mocked: the server is `weed server -s3` on free local ports, the transfers are the
real s5cmd binary and boto3, and failures (missing bucket, denied access, killed downloads, truncated
files) are produced for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, ServerProcess

from scripts.seaweedfs import OUTSIDER, SeaweedS3
from serving.artifacts.cache import cache_folder, problem

BIG_BYTES = 384 * 1024 * 1024


def _tiny_llama(dest: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model("llama", dest, seed=0)


def _big_safetensors(path: Path, payload: int) -> Path:
    """A valid safetensors file of `payload` zero bytes, written sparse so it costs no time to make."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}}).encode()
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + payload)
    return path


def _env(server: SeaweedS3, download_dir: Path, **extra: str) -> dict[str, str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "SERVING_", "AWS_", "S5CMD"))
    }
    return {
        **clean,
        **server.env(),
        "SERVING_DOWNLOAD_DIR": str(download_dir),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def _pull_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "serving", "pull", *args]


def pull(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        _pull_cmd(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_in_s3(s3, tiny_model) -> str:
    s3.upload_folder(tiny_model, "models", "tiny")
    return "s3://models/tiny/"


@pytest.fixture(scope="module")
def big_in_s3(s3, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("big")
    (folder / "config.json").write_text("{}")
    _big_safetensors(folder / "model.safetensors", BIG_BYTES)
    s3.upload_folder(folder, "models", "big")
    return "s3://models/big/"


def _greedy_ids(url: str, prompt: str, new_tokens: int) -> list[int]:
    import requests

    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": new_tokens, "do_sample": False},
        "stream": True,
    }
    with requests.post(url + "/invocations", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200, resp.text
        return [json.loads(line)["token"]["id"] for line in resp.iter_lines() if line]


def _hf_greedy_ids(model_dir: Path, prompt: str, new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_serves_from_s3_then_restarts_from_the_cache_with_s3_stopped(tmp_path, tiny_model):
    server = SeaweedS3(tmp_path / "s3").start()  # its own server: this test stops it
    try:
        server.upload_folder(tiny_model, "models", "tiny")
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        (model_dir / "serving.properties").write_text(
            "option.model_id=s3://models/tiny/\noption.dtype=fp32\noption.max_model_len=64\n"
            "option.max_rolling_batch_size=2\n"
        )
        env = _env(server, tmp_path / "downloads")
        expected = _hf_greedy_ids(tiny_model, "hello world", 6)
        with ServerProcess(model_dir, env) as srv:
            srv.wait_ready(timeout_s=180)
            assert _greedy_ids(srv.url, "hello world", 6) == expected
            assert "s5cmd" in srv.output()  # the log names the tool that fetched it
    finally:
        server.stop()
    with ServerProcess(model_dir, env) as srv:  # S3 is gone: only the cache can serve this
        srv.wait_ready(timeout_s=180)
        assert _greedy_ids(srv.url, "hello world", 6) == expected
        assert "Using cached s3://models/tiny/" in srv.output()


def test_boto3_fallback_fetches_identical_files(s3, tiny_in_s3, tiny_model, tmp_path):
    result = pull(_env(s3, tmp_path / "dl", S5CMD_PATH=str(tmp_path / "no-s5cmd")), tiny_in_s3)
    assert result.returncode == 0, result.stderr
    assert "s5cmd not found" in result.stderr
    assert "with boto3" in result.stderr
    folder = Path(result.stdout.strip())
    for source in tiny_model.iterdir():
        assert (folder / source.name).read_bytes() == source.read_bytes(), source.name


def test_only_needed_files_are_fetched_unless_patterns_say_otherwise(s3, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    _big_safetensors(repo / "model.safetensors", 64)
    (repo / "pytorch_model.bin").write_bytes(b"pickle copy of the weights")
    (repo / "flax_model.msgpack").write_bytes(b"flax copy")
    s3.upload_folder(repo, "models", "dup")
    env = _env(s3, tmp_path / "dl")
    default = pull(env, "s3://models/dup/")
    assert default.returncode == 0, default.stderr
    assert sorted(p.name for p in Path(default.stdout.strip()).iterdir()) == [
        ".lmi-manifest.json", "config.json", "model.safetensors",
    ]  # fmt: skip
    chosen = pull(
        env, "s3://models/dup/", "--allow-patterns", "*.json,*.bin", "--dest", str(tmp_path / "bin")
    )
    assert chosen.returncode == 0, chosen.stderr
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == [
        ".lmi-manifest.json", "config.json", "pytorch_model.bin",
    ]  # fmt: skip


def test_a_killed_download_leaves_no_trusted_cache(s3, big_in_s3, tmp_path):
    downloads = tmp_path / "dl"
    env = _env(s3, downloads)
    target = cache_folder(downloads, big_in_s3)
    proc = subprocess.Popen(
        _pull_cmd(big_in_s3), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    partial = 0
    while time.monotonic() < deadline and proc.poll() is None and partial < 4 * 1024 * 1024:
        partial = sum(f.stat().st_size for f in downloads.glob(".*.staging-*/**/*") if f.is_file())
        time.sleep(0.01)
    assert proc.poll() is None, "the pull finished before it could be interrupted"
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.communicate(timeout=30)
    assert list(downloads.glob(".*.staging-*")), "the interrupted download left its staging folder"
    assert not target.exists()
    assert problem(target, big_in_s3) is not None
    again = pull(env, big_in_s3)
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted download" in again.stderr
    assert Path(again.stdout.strip()) == target
    assert problem(target, big_in_s3) is None
    assert list(downloads.glob(".*.staging-*")) == []


def test_download_timeout_stops_the_pull_with_a_clear_error(s3, big_in_s3, tmp_path):
    result = pull(_env(s3, tmp_path / "dl"), big_in_s3, "--timeout", "0.3")
    assert result.returncode == 1
    assert "did not finish within the download timeout" in result.stderr
    assert "Raise option.download_timeout" in result.stderr
    assert not cache_folder(tmp_path / "dl", big_in_s3).exists()


def test_concurrent_pulls_download_once(s3, big_in_s3, tmp_path):
    env = _env(s3, tmp_path / "dl")
    procs = [
        subprocess.Popen(
            _pull_cmd(big_in_s3), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert sum(err.count("Fetching 2 files") for _, err in outputs) == 1


def test_a_truncated_cached_file_is_detected_and_fetched_again(s3, tiny_in_s3, tiny_model, tmp_path):
    env = _env(s3, tmp_path / "dl")
    folder = Path(pull(env, tiny_in_s3).stdout.strip())
    weights = folder / "model.safetensors"
    full = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(full // 2)
    again = pull(env, tiny_in_s3)
    assert again.returncode == 0, again.stderr
    assert f"model.safetensors in {folder} is {full // 2} bytes, expected {full}" in again.stderr
    assert weights.read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_each_failure_has_its_own_message(s3, tiny_in_s3, tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    s3.upload_folder(tmp_path / "cfg", "models", "noweights")
    (tmp_path / "cfg" / "pytorch_model.bin").write_bytes(b"pickle")
    s3.upload_folder(tmp_path / "cfg", "models", "pickled")
    env = _env(s3, tmp_path / "dl")
    cases = {
        "s3://models/pickled/": "has no *.safetensors weights, only pickle files",
        "s3://models/absent/": "No objects under s3://models/absent/",
        "s3://no-bucket-here/x/": "S3 bucket 'no-bucket-here' does not exist",
        "s3://models/noweights/": "has config.json but no weights",
    }
    for url, message in cases.items():
        result = pull(env, url)
        assert result.returncode == 1, url
        assert message in result.stderr, result.stderr
    denied = pull({**env, "AWS_ACCESS_KEY_ID": OUTSIDER[0], "AWS_SECRET_ACCESS_KEY": OUTSIDER[1]}, tiny_in_s3)
    assert denied.returncode == 1
    assert "Access denied to s3://models/tiny/ (AccessDenied)" in denied.stderr


def test_ping_reports_a_failed_download_instead_of_hanging(s3, tiny_in_s3, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "serving.properties").write_text("option.model_id=s3://models/absent/\n")
    with ServerProcess(model_dir, _env(s3, tmp_path / "dl")) as srv:
        resp = srv.wait_ready(timeout_s=120, expect=500)
        assert resp.json()["model"]["status"] == "FAILED"
        assert "No objects under s3://models/absent/" in resp.json()["model"]["reason"]
        answer = srv.post(json_body={"inputs": "hi"})
        assert answer.status_code == 503
        assert "No objects under s3://models/absent/" in answer.json()["message"]


def test_a_transfer_that_dies_is_retried_and_only_the_rest_fetched(s3, big_in_s3, tmp_path):
    """Kill the s5cmd process mid-transfer (a real transient failure): the pull retries and succeeds."""
    env = _env(s3, tmp_path / "dl")
    proc = subprocess.Popen(
        _pull_cmd(big_in_s3), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        children = subprocess.run(["pgrep", "-P", str(proc.pid), "s5cmd"], capture_output=True, text=True)
        staged = sum(f.stat().st_size for f in (tmp_path / "dl").glob(".*.staging-*/**/*") if f.is_file())
        if children.stdout.strip() and staged > 1024 * 1024:
            subprocess.run(["kill", "-9", *children.stdout.split()], check=False)
            killed = True
        time.sleep(0.01)
    assert killed, "the transfer finished before it could be interrupted"
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    assert "Download attempt 1 of s3://models/big/ failed" in err.decode()
    assert problem(Path(out.decode().strip()), big_in_s3) is None


def test_odd_key_names_and_a_single_archive(s3, tmp_path):
    """s5cmd gets literal keys (quotes, spaces, glob characters); an archive alone under a prefix is
    downloaded and extracted, unwrapping its single top folder."""
    repo = tmp_path / "odd"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    _big_safetensors(repo / "model.safetensors", 64)
    odd = 'notes [v1] "draft" *?.txt'
    (repo / odd).write_text("kept verbatim")
    s3.upload_folder(repo, "models", "odd")
    env = _env(s3, tmp_path / "dl")
    result = pull(env, "s3://models/odd/")
    assert result.returncode == 0, result.stderr
    assert (Path(result.stdout.strip()) / odd).read_text() == "kept verbatim"

    import tarfile

    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(repo / "config.json", "model/config.json")
        tar.add(repo / "model.safetensors", "model/model.safetensors")
    client = s3.client()
    client.upload_file(str(tmp_path / "model.tar.gz"), "models", "packed/model.tar.gz")
    packed = pull(env, "s3://models/packed/")
    assert packed.returncode == 0, packed.stderr
    folder = Path(packed.stdout.strip())
    assert folder.name == "model"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
