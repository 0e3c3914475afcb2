"""Multi-model endpoints through the real server: SageMaker's MME container API and DJL's management API.

The SageMaker server starts empty (``SAGEMAKER_MULTI_MODEL=true``) with a 1000 MB memory budget and
is given a tiny random Llama (text generation, ~1 MB estimated), a tiny BERT classifier that declares
``required_memory_mb=400``, and copies of the probe handler (tests/fixtures/probe), whose answers
name the worker pid and the handler's own init properties.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import time

import pytest
import requests
from support import FIXTURES, ServerProcess, free_port, tiny_model_script

BUDGET_MB = 1000
TARGET = {"X-Amzn-SageMaker-Target-Model": "model.tar.gz"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    script = tiny_model_script()
    paths = {"llama": script.make_tiny_model("llama", root / "llama", seed=0)}
    paths["bert"] = script.make_tiny_model("bert-cls", root / "bert", seed=0)
    (paths["bert"] / "serving.properties").write_text("required_memory_mb=400\nbatch_size=4\n")
    extra = {"big": "required_memory_mb=700\n", "echo": "", "echo2": "", "broken": "option.init_fail=1\n"}
    for name, properties in extra.items():
        paths[name] = root / name
        shutil.copytree(FIXTURES / "probe", paths[name])
        with open(paths[name] / "serving.properties", "a", encoding="utf-8") as fh:
            fh.write(properties)
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def mme():
    env = {
        "SAGEMAKER_MULTI_MODEL": "true",
        "SERVING_MEMORY_BUDGET_MB": str(BUDGET_MB),
        "OPTION_MAX_MODEL_LEN": "128",
        "OPTION_MAX_ROLLING_BATCH_SIZE": "4",
        "OPTION_DTYPE": "fp32",  # the concurrency test compares answers token for token
    }
    with ServerProcess(None, env) as srv:
        srv.wait_ready()
        yield srv


def load(srv: ServerProcess, name: str, url: str) -> requests.Response:
    return requests.post(srv.url + "/models", json={"model_name": name, "url": url}, timeout=300)


def generate(srv: ServerProcess, prompt: str) -> requests.Response:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8}}
    return srv.post("/models/llama/invoke", body, headers=TARGET)


def classify(srv: ServerProcess, text: str) -> requests.Response:
    return srv.post("/models/bert/invoke", {"inputs": text}, headers=TARGET)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def loaded(mme, models) -> dict[str, requests.Response]:
    """Load the Llama and the BERT model once for the tests that need both; print the load time."""
    responses = {}
    for name in ("llama", "bert"):
        started = time.monotonic()
        responses[name] = load(mme, name, models[name])
        print(
            f"\nMME load of tiny {name}: {time.monotonic() - started:.2f} s -> {responses[name].status_code}"
        )
    return responses


# ---- SageMaker's multi-model API --------------------------------------------------------------------


def test_an_empty_endpoint_is_healthy_and_lists_no_model(mme):
    ping = mme.ping()
    assert (ping.status_code, ping.json()) == (200, {})
    assert requests.get(mme.url + "/models", timeout=5).json() == {"models": []}
    unnamed = mme.post(json_body={"inputs": "hi"})
    assert unnamed.status_code == 404
    assert "No model is loaded" in unnamed.json()["message"]


def test_two_models_load_and_each_answers_its_own_requests(mme, models, loaded):
    assert {name: r.status_code for name, r in loaded.items()} == {"llama": 200, "bert": 200}
    assert loaded["llama"].json() == {"status": 'Model "llama" registered.'}
    listed = requests.get(mme.url + "/models", timeout=5).json()
    assert listed == {
        "models": [
            {"modelName": "bert", "modelUrl": models["bert"]},
            {"modelName": "llama", "modelUrl": models["llama"]},
        ]
    }
    described = requests.get(mme.url + "/models/bert", timeout=5)
    assert described.json() == {"modelName": "bert", "modelUrl": models["bert"]}
    generated = generate(mme, "hello world")
    assert generated.status_code == 200, generated.text
    assert isinstance(generated.json()["generated_text"], str)
    classified = classify(mme, "I love this movie")
    assert classified.status_code == 200, classified.text
    assert classified.json()["label"] in ("POSITIVE", "NEGATIVE")
    assert mme.ping().json() == {"bert": {"status": "Healthy"}, "llama": {"status": "Healthy"}}


def test_an_unnamed_request_with_two_models_is_400_naming_them(mme, loaded):
    resp = mme.post(json_body={"inputs": "hi"})
    assert resp.status_code == 400
    assert "model_name is required: 2 models are loaded (['bert', 'llama'])" in resp.json()["message"]
    assert mme.post("/invocations?model_name=bert", {"inputs": "hi"}).json()["label"]


def test_loading_a_loaded_model_again_is_409(mme, models, loaded):
    resp = load(mme, "llama", models["llama"])
    assert resp.status_code == 409
    assert "'llama' is already loaded" in resp.json()["message"]
    assert generate(mme, "still here").status_code == 200


def test_concurrent_invocations_of_two_models(mme, loaded):
    prompts = [f"request {i} about the quick brown fox" for i in range(8)]
    texts = [f"I love this movie, number {i}" for i in range(8)]
    expected_tokens = [generate(mme, p).json()["generated_text"] for p in prompts]
    expected_labels = [classify(mme, t).json() for t in texts]
    with cf.ThreadPoolExecutor(16) as pool:
        generations = [pool.submit(generate, mme, p) for p in prompts]
        classifications = [pool.submit(classify, mme, t) for t in texts]
        got_tokens = [f.result().json()["generated_text"] for f in generations]
        got_labels = [f.result().json() for f in classifications]
    assert got_tokens == expected_tokens  # each answer from its own model, whatever ran beside it
    assert got_labels == expected_labels


def test_models_are_listed_page_by_page(mme, loaded):
    first = requests.get(mme.url + "/models?limit=1", timeout=5).json()
    assert [m["modelName"] for m in first["models"]] == ["bert"]
    token = first["nextPageToken"]
    second = requests.get(f"{mme.url}/models?limit=1&next_page_token={token}", timeout=5).json()
    assert second == {"models": [{"modelName": "llama", "modelUrl": second["models"][0]["modelUrl"]}]}
    bad = requests.get(mme.url + "/models?limit=zero", timeout=5)
    assert bad.status_code == 400
    assert "Invalid limit='zero'" in bad.json()["message"]


def test_a_model_beyond_the_memory_budget_is_507_until_another_is_unloaded(mme, models, loaded):
    refused = load(mme, "big", models["big"])
    assert refused.status_code == 507
    message = refused.json()["message"]
    assert "it needs 700 MB (1 worker(s) × 700 MB, required_memory_mb=700)" in message
    assert f"of memory_budget_mb={BUDGET_MB} MB are free" in message
    assert "'bert' 400 MB" in message
    assert requests.get(mme.url + "/models/big", timeout=5).status_code == 404

    assert requests.delete(mme.url + "/models/bert", timeout=60).status_code == 200
    accepted = load(mme, "big", models["big"])
    assert accepted.status_code == 200, accepted.text
    answer = mme.post("/models/big/invoke", {"echo": "big"}).json()
    assert (answer["echo"], answer["init_key"]) == ("big", "from-file")  # its own serving.properties
    assert requests.delete(mme.url + "/models/big", timeout=60).status_code == 200
    assert not process_exists(answer["pid"])


def test_a_deleted_model_is_404_and_its_worker_is_gone(mme, models):
    assert load(mme, "echo", models["echo"]).status_code == 200
    pid = mme.post("/models/echo/invoke", {"echo": 1}).json()["pid"]
    deleted = requests.delete(mme.url + "/models/echo", timeout=60)
    assert (deleted.status_code, deleted.json()) == (200, {"status": 'Model "echo" unregistered.'})
    assert not process_exists(pid)  # resources are reclaimed when DELETE returns
    assert requests.get(mme.url + "/models/echo", timeout=5).status_code == 404
    assert requests.delete(mme.url + "/models/echo", timeout=5).status_code == 404
    invoked = mme.post("/models/echo/invoke", {"echo": 1})
    assert invoked.status_code == 404
    assert "Model 'echo' not found" in invoked.json()["message"]
    assert mme.ping().status_code == 200


def test_a_failed_load_is_500_naming_the_reason_and_leaves_nothing(mme, models):
    resp = load(mme, "broken", models["broken"])
    assert resp.status_code == 500
    assert "RuntimeError: init failed on purpose" in resp.json()["message"]
    assert requests.get(mme.url + "/models/broken", timeout=5).status_code == 404
    assert mme.ping().status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model_name": "x", "url": "/no/such/folder"}, "is not a local folder"),
        ({"model_name": "x"}, "names no model url"),
        ([1, 2], "must be a JSON object"),
        ({"model_name": "a/b", "url": "/tmp"}, "Invalid model_name 'a/b'"),
    ],
)
def test_bad_load_requests_are_400_saying_what_to_fix(mme, body, message):
    resp = requests.post(mme.url + "/models", json=body, timeout=30)
    assert resp.status_code == 400
    assert message in resp.json()["message"]
    assert "Fix:" in resp.json()["message"]


def test_mme_unload_and_reload_time(mme, models, loaded):
    """The figure the README quotes: unloading and loading the tiny Llama on this machine."""
    started = time.monotonic()
    assert requests.delete(mme.url + "/models/llama", timeout=60).status_code == 200
    unloaded = time.monotonic()
    assert load(mme, "llama", models["llama"]).status_code == 200
    reloaded = time.monotonic()
    assert generate(mme, "hello").status_code == 200
    print(f"\nMME unload of tiny llama: {unloaded - started:.2f} s; reload: {reloaded - unloaded:.2f} s")


# ---- DJL's management API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def managed():
    """The probe served as the start-up model, with the management API on its own loopback port."""
    port = free_port()
    env = {"SERVING_ENABLE_MANAGEMENT_API": "true", "SERVING_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{port}"}
    with ServerProcess(FIXTURES / "probe", env) as srv:
        srv.wait_ready()
        yield srv, f"http://127.0.0.1:{port}"


def test_management_routes_are_only_on_the_management_listener(managed):
    srv, admin = managed
    assert requests.get(srv.url + "/models", timeout=5).status_code == 404
    listed = requests.get(admin + "/models", timeout=5).json()
    assert listed["models"][0]["modelName"] == "probe"
    assert listed["models"][0]["status"] == "Healthy"


def test_djl_load_scale_describe_and_unload(managed, models):
    srv, admin = managed
    loaded = requests.post(f"{admin}/models?url={models['echo2']}&model_name=p2&batch_size=4", timeout=120)
    assert (loaded.status_code, loaded.json()) == (200, {"status": 'Model "p2" registered.'})
    p2_pid = srv.post("/predictions/p2", {"echo": 2}).json()["pid"]
    assert srv.post(json_body={"echo": 1}).json()["pid"] != p2_pid  # unnamed: the start-up model

    [described] = requests.get(f"{admin}/models/p2", timeout=5).json()
    assert described["workflowName"] == "p2"
    assert described["models"][0]["batchSize"] == 4
    assert described["models"][0]["loadedAtStartup"] is False

    assert requests.put(f"{admin}/models/p2?min_worker=2", timeout=120).status_code == 200
    workers = requests.get(f"{admin}/models/p2", timeout=5).json()[0]["models"][0]["workerGroups"][0][
        "workers"
    ]
    assert [w["status"] for w in workers] == ["READY", "READY"]
    scaled_down = requests.put(f"{admin}/models/p2?min_worker=1", timeout=120)
    assert scaled_down.json() == {"status": 'Model "p2" scaled to 1 worker(s).'}
    retired = next(w["pid"] for w in workers if w["id"] == 1)
    deadline = time.monotonic() + 10
    while process_exists(retired) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_exists(retired)

    assert requests.delete(f"{admin}/models/p2", timeout=60).json() == {"status": 'Model "p2" unregistered.'}
    assert srv.post("/predictions/p2", {"echo": 2}).status_code == 404
    assert srv.post(json_body={"echo": 3}).json()["echo"] == 3


def test_djl_asynchronous_load_answers_202_at_once(managed, models):
    _, admin = managed
    resp = requests.post(f"{admin}/models?url={models['echo2']}&model_name=p3&synchronous=false", timeout=30)
    assert (resp.status_code, resp.json()) == (202, {"status": 'Model "p3" registration scheduled.'})
    deadline = time.monotonic() + 60
    status = None
    while status != "Healthy" and time.monotonic() < deadline:
        status = requests.get(f"{admin}/models/p3", timeout=5).json()[0]["models"][0]["status"]
        time.sleep(0.1)
    assert status == "Healthy"
    unknown = requests.post(f"{admin}/models?url={models['echo2']}&model_name=p4&min_workers=2", timeout=30)
    assert unknown.status_code == 400
    assert "Unknown load parameter(s) ['min_workers']" in unknown.json()["message"]
