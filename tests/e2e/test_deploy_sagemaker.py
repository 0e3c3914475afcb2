"""lmi deploy / lmi invoke against moto's server mode: a real HTTP SageMaker API on 127.0.0.1.

moto records every request it receives (MOTO_ENABLE_RECORDING), so the tests assert what went over
the wire, not what the code meant to send. moto 5 implements models, endpoint configs, endpoints
(InService at once), their tags and waiters, and InvokeEndpoint; it does not implement UpdateEndpoint,
the inference-component calls, endpoint configs without a model (inference-component endpoints), or
InvokeEndpointWithResponseStream. For those the tests check the requests up to moto's refusal and
that the command fails naming the call.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
import yaml
from support import free_port

from serving.cli import build_parser
from serving.deploy import parse_spec
from serving.deploy.plan import OWNER_TAG, plan

REGION = "us-west-2"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
SPEC = {
    "endpoint": "demo",
    "region": REGION,
    "role": ROLE,
    "image": "123456789012.dkr.ecr.us-west-2.amazonaws.com/lmi-serving:cpu",
    "model_data": "s3://models/demo/",
    "environment": {"HF_MODEL_ID": "org/tiny", "OPTION_ROLLING_BATCH": "auto", "SERVING_LOG_LEVEL": "info"},
    "instance_type": "ml.g4dn.xlarge",  # moto's instance-type list predates ml.g5
    "instance_count": 2,
    "volume_size_gb": 40,
    "model_data_download_timeout": 900,
    "container_startup_health_check_timeout": 600,
}
WRITES = ("Create", "Update", "Delete")


class MotoServer:
    """``python -m moto.server`` on a free port, recording every request it receives to a file."""

    def __init__(self, tmp: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.recording = tmp / "recording.jsonl"
        self.log = (tmp / "moto.log").open("wb")
        env = {**os.environ, "MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(self.recording)}
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", self.url.rsplit(":", 1)[1]]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.url + "/moto-api/data.json", timeout=2)
                return
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start: {(tmp / 'moto.log').read_text()}"
                    ) from None
                time.sleep(0.2)

    def reset(self) -> None:
        requests.post(self.url + "/moto-api/reset", timeout=10)
        self.forget()

    def forget(self) -> None:
        requests.post(self.url + "/moto-api/recorder/reset-recording", timeout=10)

    def calls(self) -> list[tuple[str, dict]]:
        """(action, request) for every request since ``forget``: SageMaker actions by their
        X-Amz-Target, runtime calls as ``POST /endpoints/...`` with their headers and body."""
        calls = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = (
                base64.b64decode(entry["body"]) if entry.get("body_encoded") else (entry.get("body") or b"")
            )
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            target = headers.get("x-amz-target", "")
            if target.startswith("SageMaker."):
                calls.append((target.removeprefix("SageMaker."), json.loads(body or b"{}")))
            elif "/endpoints/" in entry["url"]:
                path = entry["url"].split("://", 1)[1].split("/", 1)[1]
                calls.append((f"{entry['method']} /{path}", {"headers": headers, "body": body}))
        return calls

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws(moto, monkeypatch, tmp_path):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_SAGEMAKER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the spec's region must win
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # moto answers unimplemented calls with 500
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    moto.reset()


def lmi(moto: MotoServer, *argv: str) -> tuple[int, list[tuple[str, dict]]]:
    """Run an lmi subcommand in-process; its exit code and the requests moto received."""
    moto.forget()
    args = build_parser().parse_args(list(argv))
    return args.run(args), moto.calls()


def write_spec(tmp_path: Path, data: dict, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def deploy(moto: MotoServer, spec: str, *extra: str) -> tuple[int, list[tuple[str, dict]]]:
    return lmi(moto, "deploy", "--spec", spec, "--poll-interval", "1", "--wait-timeout", "20", *extra)


def writes(calls: list[tuple[str, dict]]) -> list[str]:
    return [action for action, _ in calls if action.startswith(WRITES)]


def sagemaker(region: str = REGION):
    return boto3.client("sagemaker", region_name=region)


def without_tags(request: dict) -> dict:
    return {k: v for k, v in request.items() if k != "Tags"}


def test_first_deploy_sends_the_spec_and_waits_for_in_service(moto, tmp_path, capsys):
    rc, calls = deploy(moto, write_spec(tmp_path, SPEC))
    assert rc == 0, capsys.readouterr().err
    expected = plan(parse_spec(SPEC))
    sent = dict(c for c in calls if c[0].startswith("Create"))
    assert writes(calls) == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
    assert sent["CreateModel"] == expected.models[0]
    assert sent["CreateEndpointConfig"] == expected.endpoint_config
    assert sent["CreateEndpoint"] == {
        "EndpointName": "demo",
        "EndpointConfigName": expected.config_name,
        "Tags": [{"Key": OWNER_TAG, "Value": "demo"}],
    }
    assert [a for a, _ in calls].count("DescribeEndpoint") >= 2  # the waiter, then the final check
    model = sagemaker().describe_model(ModelName=expected.models[0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataSource"]["S3DataSource"] == {
        "S3Uri": "s3://models/demo/", "S3DataType": "S3Prefix", "CompressionType": "None",
    }  # fmt: skip
    assert model["PrimaryContainer"]["Environment"] == SPEC["environment"]
    endpoint = sagemaker().describe_endpoint(EndpointName="demo")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", expected.config_name)
    assert ":us-west-2:" in endpoint["EndpointArn"]
    assert "InService with endpoint config" in capsys.readouterr().out


def test_rerun_of_an_unchanged_spec_changes_nothing(moto, tmp_path, capsys):
    spec = write_spec(tmp_path, SPEC)
    assert deploy(moto, spec)[0] == 0
    capsys.readouterr()
    rc, calls = deploy(moto, spec)
    assert rc == 0
    assert writes(calls) == []
    assert [a for a, _ in calls] == ["DescribeModel", "DescribeEndpointConfig", "DescribeEndpoint"]
    out = capsys.readouterr().out
    assert ": exists" in out
    assert "already on endpoint config" in out


def test_changed_spec_creates_new_versions_and_updates_the_endpoint(moto, tmp_path, capsys):
    assert deploy(moto, write_spec(tmp_path, SPEC))[0] == 0
    old = plan(parse_spec(SPEC))
    changed = {**SPEC, "environment": {**SPEC["environment"], "OPTION_ROLLING_BATCH": "disable"}}
    new = plan(parse_spec(changed))
    rc, calls = deploy(moto, write_spec(tmp_path, changed, "changed.yaml"))
    sent = dict(c for c in calls if c[0].startswith(WRITES))
    assert writes(calls) == ["CreateModel", "CreateEndpointConfig", "UpdateEndpoint"]
    assert sent["CreateModel"]["ModelName"] != old.models[0]["ModelName"]
    assert sent["CreateModel"]["PrimaryContainer"]["Environment"]["OPTION_ROLLING_BATCH"] == "disable"
    assert sent["UpdateEndpoint"] == {"EndpointName": "demo", "EndpointConfigName": new.config_name}
    # moto does not implement UpdateEndpoint: the command fails and names it; nothing old was removed
    assert rc == 1
    assert "UpdateEndpoint operation" in capsys.readouterr().err
    names = {m["ModelName"] for m in sagemaker().list_models()["Models"]}
    assert names == {old.models[0]["ModelName"], new.models[0]["ModelName"]}


def test_delete_removes_everything_and_a_second_delete_finds_nothing(moto, tmp_path, capsys):
    spec = write_spec(tmp_path, SPEC)
    assert deploy(moto, spec)[0] == 0
    rc, calls = deploy(moto, spec, "--delete")
    assert rc == 0
    assert writes(calls) == ["DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel"]
    assert [a for a, _ in calls].count("ListTags") == 2  # the owner tag is checked before each delete
    client = sagemaker()
    assert client.list_endpoints()["Endpoints"] == []
    assert client.list_endpoint_configs()["EndpointConfigs"] == []
    assert client.list_models()["Models"] == []
    capsys.readouterr()
    rc, calls = deploy(moto, spec, "--delete")
    assert rc == 0
    assert writes(calls) == []
    assert "nothing to delete" in capsys.readouterr().out


def test_delete_leaves_configs_and_models_it_did_not_make(moto, tmp_path, capsys):
    client = sagemaker()
    client.create_model(ModelName="shared", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "x"})
    variant = {"VariantName": "AllTraffic", "ModelName": "shared", "InstanceType": "ml.m5.large",
               "InitialInstanceCount": 1}  # fmt: skip
    client.create_endpoint_config(EndpointConfigName="hand-made", ProductionVariants=[variant])
    client.create_endpoint(EndpointName="demo", EndpointConfigName="hand-made")
    rc, calls = deploy(moto, write_spec(tmp_path, SPEC), "--delete")
    assert rc == 0
    assert writes(calls) == ["DeleteEndpoint"]
    out = capsys.readouterr().out
    assert "endpoint config hand-made: not made by lmi deploy" in out
    assert "model shared: not made by" in out
    assert [m["ModelName"] for m in client.list_models()["Models"]] == ["shared"]


def test_model_tar_gz_goes_in_model_data_url(moto, tmp_path):
    spec = {**SPEC, "model_data": "s3://models/demo/model.tar.gz"}
    assert deploy(moto, write_spec(tmp_path, spec))[0] == 0
    name = plan(parse_spec(spec)).models[0]["ModelName"]
    container = sagemaker().describe_model(ModelName=name)["PrimaryContainer"]
    assert container["ModelDataUrl"] == "s3://models/demo/model.tar.gz"
    assert "ModelDataSource" not in container


def test_inference_component_deploy_sends_models_then_a_model_less_config(moto, tmp_path, capsys):
    spec = {k: v for k, v in SPEC.items() if k not in ("model_data", "volume_size_gb")}
    spec["components"] = [
        {
            "name": "chat",
            "model_data": "s3://models/chat/",
            "accelerators": 1,
            "memory_mb": 8192,
            "copies": 2,
        },
        {"name": "embed", "model_data": "s3://models/embed.tar.gz", "cpus": 1, "memory_mb": 1024},
    ]
    rc, calls = deploy(moto, write_spec(tmp_path, spec))
    expected = plan(parse_spec(spec))
    created = [body for action, body in calls if action == "CreateModel"]
    assert created == list(expected.models)
    (config,) = [body for action, body in calls if action == "CreateEndpointConfig"]
    assert config == expected.endpoint_config
    assert config["ExecutionRoleArn"] == ROLE
    assert "ModelName" not in config["ProductionVariants"][0]
    # moto cannot store an endpoint config without a model (500): the deploy stops there, naming the call
    assert rc == 1
    assert "CreateEndpointConfig operation" in capsys.readouterr().err
    assert "CreateInferenceComponent" not in [a for a, _ in calls]


def test_invoke_endpoint_prints_the_answer(moto, tmp_path, capsys):
    answer = {"results": [{"Body": '{"generated_text": " Paris."}', "ContentType": "application/json"}]}
    requests.post(moto.url + "/moto-api/static/sagemaker/endpoint-results", json={**answer, "region": REGION})
    rc, calls = lmi(moto, "invoke", "--spec", write_spec(tmp_path, SPEC), "The capital of France is")
    assert rc == 0
    assert capsys.readouterr().out == '{"generated_text": " Paris."}\n'
    ((action, request),) = calls
    assert action == "POST /endpoints/demo/invocations"
    assert json.loads(request["body"]) == {
        "inputs": "The capital of France is",
        "parameters": {"max_new_tokens": 64},
    }
    assert request["headers"]["content-type"] == "application/json"


def test_invoke_names_the_inference_component(moto, capsys):
    rc, calls = lmi(
        moto, "invoke", "--endpoint", "pool", "--region", REGION, "--component", "pool-chat", "hi"
    )
    assert rc == 0
    ((action, request),) = calls
    assert action == "POST /endpoints/pool/invocations"
    assert request["headers"]["x-amzn-sagemaker-inference-component"] == "pool-chat"


def test_invoke_stream_calls_the_streaming_api(moto, capsys):
    rc, _ = lmi(moto, "invoke", "--endpoint", "demo", "--region", REGION, "--stream", "hi")
    # moto has no InvokeEndpointWithResponseStream route (its 404 is not even recorded): the command
    # fails and names the call; streaming itself is tested against a real server in test_invoke_local.py
    assert rc == 1
    assert "InvokeEndpointWithResponseStream operation" in capsys.readouterr().err


def test_no_region_anywhere_is_a_clear_error(moto, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    rc, calls = deploy(moto, write_spec(tmp_path, {k: v for k, v in SPEC.items() if k != "region"}))
    assert rc == 1
    assert calls == []
    assert "NoRegionError" in capsys.readouterr().err
