"""The SageMaker API as deploy needs it: missing resources as None, bounded waits, failure reasons.

Every call goes through ``SageMaker.call`` so an API error becomes a ``DeployError`` naming the
operation and SageMaker's message; every wait ends in a state or a timeout that says which resource
and, when SageMaker gives one, its ``FailureReason``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from serving.deploy.plan import OWNER_TAG

# kind -> (describe operation, delete operation, name parameter, ARN field)
KINDS = {
    "model": ("describe_model", "delete_model", "ModelName", "ModelArn"),
    "endpoint config": (
        "describe_endpoint_config", "delete_endpoint_config", "EndpointConfigName", "EndpointConfigArn",
    ),
    "endpoint": ("describe_endpoint", "delete_endpoint", "EndpointName", "EndpointArn"),
    "inference component": (
        "describe_inference_component", "delete_inference_component", "InferenceComponentName",
        "InferenceComponentArn",
    ),
}  # fmt: skip
ENDPOINT_BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack")
COMPONENT_BUSY = ("Creating", "Updating", "Deleting")


class DeployError(Exception):
    """A call or a wait failed; the message names the resource and SageMaker's reason."""


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:500]


def is_not_found(exc: Exception) -> bool:
    """SageMaker answers a describe of a missing resource with ValidationException 'Could not find'."""
    error = getattr(exc, "response", {}).get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "").lower()
    return code in ("ValidationException", "ResourceNotFound") and "could not find" in message


class SageMaker:
    """A boto3 ``sagemaker`` client with progress lines, None for missing resources, bounded waits."""

    def __init__(self, client: Any, say: Callable[[str], None], timeout_s: float, poll_s: float) -> None:
        self.client = client
        self.say = say
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            return getattr(self.client, operation)(**params)
        except ClientError as exc:
            raise DeployError(_first_line(exc)) from None

    def describe(self, kind: str, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        operation, _, key, _ = KINDS[kind]
        try:
            return getattr(self.client, operation)(**{key: name})
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise DeployError(_first_line(exc)) from None

    def delete(self, kind: str, name: str) -> None:
        _, operation, key, _ = KINDS[kind]
        self.call(operation, **{key: name})
        self.say(
            f"{kind} {name}: deleting"
            if kind in ("endpoint", "inference component")
            else f"{kind} {name}: deleted"
        )

    def owned(self, kind: str, description: dict[str, Any], endpoint: str) -> bool:
        """Whether ``lmi deploy`` created this resource for ``endpoint`` (its owner tag)."""
        arn = description[KINDS[kind][3]]
        tags = self.call("list_tags", ResourceArn=arn).get("Tags", [])
        return any(t.get("Key") == OWNER_TAG and t.get("Value") == endpoint for t in tags)

    def remove_owned(
        self, kind: str, name: str, endpoint: str, current: dict[str, Any] | None = None
    ) -> bool:
        """Delete a model or endpoint config if lmi deploy made it for ``endpoint``; say so if not."""
        current = current or self.describe(kind, name)
        if current is None:
            return False
        if not self.owned(kind, current, endpoint):
            self.say(f"{kind} {name}: not made by lmi deploy for endpoint {endpoint}; left alone")
            return False
        self.delete(kind, name)
        return True

    def list_components(self, endpoint: str) -> list[str]:
        names: list[str] = []
        params: dict[str, Any] = {"EndpointNameEquals": endpoint, "MaxResults": 100}
        while True:
            page = self.call("list_inference_components", **params)
            names += [c["InferenceComponentName"] for c in page.get("InferenceComponents", [])]
            if not page.get("NextToken"):
                return names
            params["NextToken"] = page["NextToken"]

    def _waiter_config(self) -> dict[str, int]:
        delay = max(1, int(self.poll_s))
        return {"Delay": delay, "MaxAttempts": max(1, math.ceil(self.timeout_s / delay))}

    def wait_endpoint(self, name: str) -> dict[str, Any] | None:
        """Wait until the endpoint is InService or Failed (gone: None), with the ``endpoint_in_service``
        waiter; still busy after the timeout raises."""
        from botocore.exceptions import WaiterError

        self.say(f"endpoint {name}: waiting for InService (up to {self.timeout_s:.0f} s)")
        try:
            self.client.get_waiter("endpoint_in_service").wait(
                EndpointName=name, WaiterConfig=self._waiter_config()
            )
        except WaiterError:
            pass  # Failed, gone or timed out: the description below says which
        current = self.describe("endpoint", name)
        if current is not None and current["EndpointStatus"] in ENDPOINT_BUSY:
            raise DeployError(
                f"endpoint {name}: still {current['EndpointStatus']} after {self.timeout_s:.0f} s"
            )
        return current

    def wait_endpoint_deleted(self, name: str) -> None:
        from botocore.exceptions import WaiterError

        try:
            self.client.get_waiter("endpoint_deleted").wait(
                EndpointName=name, WaiterConfig=self._waiter_config()
            )
        except WaiterError as exc:
            raise DeployError(f"endpoint {name}: not deleted after {self.timeout_s:.0f} s ({exc})") from None
        self.say(f"endpoint {name}: deleted")

    def settle_endpoint(self, name: str) -> dict[str, Any] | None:
        """The endpoint once no operation is running on it; None when it does not exist."""
        current = self.describe("endpoint", name)
        if current is None:
            return None
        status = current["EndpointStatus"]
        if status == "Deleting":
            self.say(f"endpoint {name}: being deleted; waiting")
            self.wait_endpoint_deleted(name)
            return None
        if status in ENDPOINT_BUSY:
            self.say(f"endpoint {name}: {status}; waiting for it to finish first")
            return self.wait_endpoint(name)
        return current

    def wait_component(self, name: str, gone: bool = False) -> dict[str, Any] | None:
        """Poll until the component is no longer busy (or, ``gone``, no longer exists); there is no
        boto3 waiter for inference components."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            current = self.describe("inference component", name)
            if current is None or (not gone and current["InferenceComponentStatus"] not in COMPONENT_BUSY):
                return current
            if time.monotonic() >= deadline:
                status = current["InferenceComponentStatus"]
                raise DeployError(f"inference component {name}: still {status} after {self.timeout_s:.0f} s")
            time.sleep(self.poll_s)


def failure(kind: str, name: str, description: dict[str, Any] | None) -> DeployError:
    """The error for a resource that did not come up: its status and SageMaker's FailureReason."""
    if description is None:
        return DeployError(f"{kind} {name}: disappeared while waiting for it")
    status = description.get("EndpointStatus") or description.get("InferenceComponentStatus")
    reason = description.get("FailureReason") or "SageMaker gave no FailureReason"
    return DeployError(f"{kind} {name}: {status}: {reason}")
