"""The SageMaker requests a spec stands for: valid against botocore's service model, named by content."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from serving.cli import build_parser
from serving.deploy import parse_spec
from serving.deploy.plan import OWNER_TAG, VARIANT, plan

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
SINGLE = {
    "endpoint": "demo",
    "role": ROLE,
    "image": "repo/lmi:1",
    "instance_type": "ml.g5.2xlarge",
    "instance_count": 2,
    "volume_size_gb": 64,
    "model_data": "s3://bucket/models/demo/",
    "environment": {"HF_MODEL_ID": "org/model", "OPTION_ROLLING_BATCH": "auto", "SERVING_LOG_LEVEL": "debug"},
    "model_data_download_timeout": 1200,
    "container_startup_health_check_timeout": 900,
}
COMPONENTS = {
    **{k: v for k, v in SINGLE.items() if k not in ("model_data", "volume_size_gb")},
    "components": [
        {"name": "chat", "model_data": "s3://bucket/chat.tar.gz", "accelerators": 1, "cpus": 2,
         "memory_mb": 16384, "copies": 2, "container_startup_health_check_timeout": 600},
        {"name": "embed", "memory_mb": 2048, "environment": {"OPTION_TASK": "feature-extraction"}},
    ],
}  # fmt: skip
NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


def validate(operation: str, params: dict) -> None:
    """Raise if botocore would refuse ``params`` for ``operation`` (names, types, required fields)."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    report = ParamValidator().validate(params, model.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()


def test_single_model_requests():
    p = plan(parse_spec(SINGLE))
    (model,) = p.models
    validate("CreateModel", model)
    validate("CreateEndpointConfig", p.endpoint_config)
    assert model["PrimaryContainer"] == {
        "Image": "repo/lmi:1",
        "ModelDataSource": {
            "S3DataSource": {
                "S3Uri": "s3://bucket/models/demo/",
                "S3DataType": "S3Prefix",
                "CompressionType": "None",
            }
        },
        "Environment": SINGLE["environment"],
    }
    assert model["ExecutionRoleArn"] == ROLE
    assert model["Tags"] == [{"Key": OWNER_TAG, "Value": "demo"}]
    assert p.endpoint_config["ProductionVariants"] == [
        {
            "VariantName": VARIANT,
            "ModelName": model["ModelName"],
            "InstanceType": "ml.g5.2xlarge",
            "InitialInstanceCount": 2,
            "VolumeSizeInGB": 64,
            "ModelDataDownloadTimeoutInSeconds": 1200,
            "ContainerStartupHealthCheckTimeoutInSeconds": 900,
        }
    ]
    assert "ExecutionRoleArn" not in p.endpoint_config
    assert p.components == ()


def test_compressed_model_data_uses_model_data_url():
    (model,) = plan(parse_spec({**SINGLE, "model_data": "s3://bucket/model.tar.gz"})).models
    assert model["PrimaryContainer"]["ModelDataUrl"] == "s3://bucket/model.tar.gz"
    assert "ModelDataSource" not in model["PrimaryContainer"]


def test_inference_component_requests():
    p = plan(parse_spec(COMPONENTS))
    for model in p.models:
        validate("CreateModel", model)
    validate("CreateEndpointConfig", p.endpoint_config)
    for request in p.components:
        validate("CreateInferenceComponent", request)
    (variant,) = p.endpoint_config["ProductionVariants"]
    assert "ModelName" not in variant
    assert p.endpoint_config["ExecutionRoleArn"] == ROLE
    chat, embed = p.components
    assert chat == {
        "InferenceComponentName": "demo-chat",
        "EndpointName": "demo",
        "VariantName": VARIANT,
        "Specification": {
            "ModelName": p.models[0]["ModelName"],
            "ComputeResourceRequirements": {
                "MinMemoryRequiredInMb": 16384,
                "NumberOfAcceleratorDevicesRequired": 1.0,
                "NumberOfCpuCoresRequired": 2.0,
            },
            "StartupParameters": {
                "ModelDataDownloadTimeoutInSeconds": 1200,
                "ContainerStartupHealthCheckTimeoutInSeconds": 600,
            },
        },
        "RuntimeConfig": {"CopyCount": 2},
        "Tags": [{"Key": OWNER_TAG, "Value": "demo"}],
    }
    assert embed["Specification"]["ComputeResourceRequirements"] == {"MinMemoryRequiredInMb": 2048}
    assert embed["RuntimeConfig"] == {"CopyCount": 1}
    assert p.models[0]["PrimaryContainer"]["ModelDataUrl"] == "s3://bucket/chat.tar.gz"
    assert p.models[1]["PrimaryContainer"]["Environment"]["OPTION_TASK"] == "feature-extraction"
    assert p.models[0]["ModelName"].startswith("demo-chat-")
    assert p.models[1]["ModelName"].startswith("demo-embed-")


def test_names_follow_the_content():
    first, again = plan(parse_spec(SINGLE)), plan(parse_spec(dict(SINGLE)))
    assert (first.models[0]["ModelName"], first.config_name) == (
        again.models[0]["ModelName"],
        again.config_name,
    )
    env_change = plan(parse_spec({**SINGLE, "environment": {"OPTION_ROLLING_BATCH": "disable"}}))
    assert env_change.models[0]["ModelName"] != first.models[0]["ModelName"]
    assert env_change.config_name != first.config_name  # the config names the new model
    count_change = plan(parse_spec({**SINGLE, "instance_count": 3}))
    assert count_change.models[0]["ModelName"] == first.models[0]["ModelName"]
    assert count_change.config_name != first.config_name


@pytest.mark.parametrize("endpoint", ["e", "a" * 63, "a-" * 31 + "b"])
def test_names_fit_sagemakers_pattern(endpoint):
    p = plan(parse_spec({**SINGLE, "endpoint": endpoint}))
    for name in (p.models[0]["ModelName"], p.config_name):
        assert len(name) <= 63
        assert NAME.fullmatch(name), name


def test_dry_run_prints_the_plan_and_calls_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: any call would fail
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(COMPONENTS))
    args = build_parser().parse_args(["deploy", "--spec", str(path), "--dry-run"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(asdict(plan(parse_spec(COMPONENTS)))))
