"""The decisions deploy makes from SageMaker's descriptions: failure messages, roll-backs, component diffs.

moto implements neither failed endpoints nor inference components, so these decisions are checked
here on descriptions shaped like SageMaker's (field names from botocore's service model).
"""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from serving.deploy import parse_spec
from serving.deploy.apply import _differs, _require_config
from serving.deploy.plan import plan
from serving.deploy.sagemaker import DeployError, failure, is_not_found

SPEC = {
    "endpoint": "ep",
    "role": "arn:aws:iam::123456789012:role/r",
    "image": "img",
    "instance_type": "ml.g5.12xlarge",
    "components": [{"name": "chat", "memory_mb": 4096, "accelerators": 1, "copies": 2}],
}


def test_failure_names_the_resource_status_and_reason():
    failed = {
        "EndpointStatus": "Failed",
        "FailureReason": "The primary container did not pass the ping check",
    }
    assert str(failure("endpoint", "ep", failed)) == (
        "endpoint ep: Failed: The primary container did not pass the ping check"
    )
    assert str(failure("inference component", "ep-chat", {"InferenceComponentStatus": "Failed"})) == (
        "inference component ep-chat: Failed: SageMaker gave no FailureReason"
    )
    assert "disappeared" in str(failure("endpoint", "ep", None))


def test_an_update_that_rolled_back_is_an_error_with_the_reason():
    rolled_back = {
        "EndpointStatus": "InService",
        "EndpointConfigName": "ep-old",
        "FailureReason": "out of capacity",
    }
    with pytest.raises(
        DeployError, match="update to endpoint config ep-new was rolled back: out of capacity"
    ):
        _require_config(rolled_back, "ep", "ep-new")
    with pytest.raises(DeployError, match="endpoint ep: Failed: bad image"):
        _require_config({"EndpointStatus": "Failed", "FailureReason": "bad image"}, "ep", "ep-new")
    _require_config({"EndpointStatus": "InService", "EndpointConfigName": "ep-new"}, "ep", "ep-new")


def described(request: dict, copies: int) -> dict:
    """DescribeInferenceComponent's answer for a component created from ``request``."""
    return {
        "InferenceComponentName": request["InferenceComponentName"],
        "EndpointName": request["EndpointName"],
        "InferenceComponentStatus": "InService",
        "Specification": {**request["Specification"]},
        "RuntimeConfig": {"DesiredCopyCount": copies, "CurrentCopyCount": copies},
    }


def test_component_diff_compares_model_resources_startup_and_copies():
    (request,) = plan(parse_spec(SPEC)).components
    assert not _differs(described(request, 2), request)
    assert _differs(described(request, 1), request)
    other_model = described(request, 2)
    other_model["Specification"]["ModelName"] = "ep-chat-00000000"
    assert _differs(other_model, request)
    more_memory = plan(parse_spec({**SPEC, "components": [{**SPEC["components"][0], "memory_mb": 8192}]}))
    assert _differs(described(request, 2), more_memory.components[0])
    with_startup = plan(parse_spec({**SPEC, "model_data_download_timeout": 600}))
    assert _differs(described(request, 2), with_startup.components[0])


@pytest.mark.parametrize(
    ("code", "message", "missing"),
    [
        ("ValidationException", 'Could not find endpoint "arn:aws:sagemaker:us-west-2:1:endpoint/ep".', True),
        ("ValidationException", 'Could not find model "m".', True),
        ("ValidationException", "Cannot update in-progress endpoint", False),
        ("AccessDeniedException", "Could not find a way in", False),
    ],
)
def test_not_found_is_sagemakers_validation_message(code, message, missing):
    exc = ClientError({"Error": {"Code": code, "Message": message}}, "DescribeEndpoint")
    assert is_not_found(exc) is missing
