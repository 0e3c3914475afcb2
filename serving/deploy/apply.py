"""``lmi deploy``: make SageMaker match the spec, creating only what is missing.

Order: models, endpoint config, endpoint (create, or update to the new config), then inference
components (create, update, or remove the ones the spec dropped), then the configs and models the
endpoint no longer uses. A re-run of an unchanged spec describes everything and creates nothing.
"""

from __future__ import annotations

from typing import Any

from serving.deploy.plan import Plan, owner_tags, plan
from serving.deploy.sagemaker import DeployError, SageMaker, failure
from serving.deploy.spec import DeploySpec


def apply(spec: DeploySpec, sm: SageMaker) -> None:
    """Deploy ``spec``; DeployError says which step failed and why."""
    p = plan(spec)
    for request in p.models:
        _ensure(sm, "model", "create_model", request["ModelName"], request)
    _ensure(sm, "endpoint config", "create_endpoint_config", p.config_name, p.endpoint_config)
    replaced_config = _sync_endpoint(sm, spec, p.config_name)
    replaced_models = _sync_components(sm, spec, p) if spec.components else set()
    if replaced_config is not None:
        replaced_models |= _remove_config(sm, spec, replaced_config)
    for name in sorted(replaced_models - p.model_names):
        sm.remove_owned("model", name, spec.endpoint)
    sm.say(f"endpoint {spec.endpoint}: InService with endpoint config {p.config_name}")


def _ensure(sm: SageMaker, kind: str, operation: str, name: str, request: dict[str, Any]) -> None:
    if sm.describe(kind, name) is not None:
        sm.say(f"{kind} {name}: exists")
        return
    sm.call(operation, **request)
    sm.say(f"{kind} {name}: created")


def _sync_endpoint(sm: SageMaker, spec: DeploySpec, config: str) -> str | None:
    """Create the endpoint or switch it to ``config``; returns the config it used before a switch."""
    name = spec.endpoint
    current = sm.settle_endpoint(name)
    if current is not None and current["EndpointStatus"] == "Failed":
        sm.say(
            f"endpoint {name}: Failed earlier ({current.get('FailureReason', 'no reason given')}); recreating"
        )
        sm.delete("endpoint", name)
        sm.wait_endpoint_deleted(name)
        current = None
    if current is None:
        sm.call("create_endpoint", EndpointName=name, EndpointConfigName=config, Tags=owner_tags(spec))
        sm.say(f"endpoint {name}: creating with endpoint config {config}")
        _require_config(sm.wait_endpoint(name), name, config)
        return None
    previous = current["EndpointConfigName"]
    if previous == config:
        _require_config(current, name, config)  # e.g. OutOfService: say so rather than "done"
        sm.say(f"endpoint {name}: InService, already on endpoint config {config}")
        return None
    sm.call("update_endpoint", EndpointName=name, EndpointConfigName=config)
    sm.say(f"endpoint {name}: updating from endpoint config {previous} to {config}")
    _require_config(sm.wait_endpoint(name), name, config)
    return previous


def _require_config(current: dict[str, Any] | None, name: str, config: str) -> None:
    """InService on ``config``: a failed update rolls back to InService on the old config."""
    if current is None or current["EndpointStatus"] != "InService":
        raise failure("endpoint", name, current)
    if current["EndpointConfigName"] != config:
        reason = current.get("FailureReason") or "SageMaker gave no FailureReason"
        raise DeployError(
            f"endpoint {name}: the update to endpoint config {config} was rolled back: {reason}"
        )


def _sync_components(sm: SageMaker, spec: DeploySpec, p: Plan) -> set[str]:
    """Create or update each component, wait for all, remove dropped ones; returns replaced models."""
    replaced, started = set(), []
    for request in p.components:
        name = request["InferenceComponentName"]
        current = _settled_component(sm, spec, name)
        if current is None:
            sm.call("create_inference_component", **request)
            sm.say(f"inference component {name}: creating")
        elif _differs(current, request):
            update = {k: request[k] for k in ("InferenceComponentName", "Specification", "RuntimeConfig")}
            sm.call("update_inference_component", **update)
            sm.say(f"inference component {name}: updating")
            replaced.add(current["Specification"]["ModelName"])
        else:
            sm.say(f"inference component {name}: InService, unchanged")
            continue
        started.append(request)
    for request in started:
        _require_component(sm, request)
    return replaced | _prune_components(sm, spec, {r["InferenceComponentName"] for r in p.components})


def _settled_component(sm: SageMaker, spec: DeploySpec, name: str) -> dict[str, Any] | None:
    current = sm.wait_component(name)
    if current is not None and current["EndpointName"] != spec.endpoint:
        raise DeployError(
            f"inference component {name} already exists on endpoint {current['EndpointName']}: names are "
            "unique in a region; rename the component in the spec"
        )
    if current is not None and current["InferenceComponentStatus"] == "Failed":
        sm.say(f"inference component {name}: Failed earlier ({current.get('FailureReason')}); recreating")
        sm.delete("inference component", name)
        sm.wait_component(name, gone=True)
        return None
    return current


def _differs(current: dict[str, Any], request: dict[str, Any]) -> bool:
    have, want = current.get("Specification", {}), request["Specification"]
    fields = ("ModelName", "ComputeResourceRequirements", "StartupParameters")
    copies = current.get("RuntimeConfig", {}).get("DesiredCopyCount")
    return any(have.get(f) != want.get(f) for f in fields) or copies != request["RuntimeConfig"]["CopyCount"]


def _require_component(sm: SageMaker, request: dict[str, Any]) -> None:
    name = request["InferenceComponentName"]
    sm.say(f"inference component {name}: waiting for InService (up to {sm.timeout_s:.0f} s)")
    current = sm.wait_component(name)
    if current is None or current["InferenceComponentStatus"] != "InService":
        raise failure("inference component", name, current)
    if _differs(current, request):  # a failed update rolls back to the old specification
        reason = current.get("FailureReason") or "SageMaker gave no FailureReason"
        raise DeployError(f"inference component {name}: the update was rolled back: {reason}")
    sm.say(f"inference component {name}: InService")


def _prune_components(sm: SageMaker, spec: DeploySpec, keep: set[str]) -> set[str]:
    """Delete the components lmi deploy made on this endpoint that the spec no longer lists."""
    gone, models = [], set()
    for name in sm.list_components(spec.endpoint):
        current = None if name in keep else sm.describe("inference component", name)
        if current is None:
            continue
        if not sm.owned("inference component", current, spec.endpoint):
            sm.say(f"inference component {name}: not in the spec and not made by lmi deploy; left alone")
            continue
        sm.delete("inference component", name)
        gone.append(name)
        models.add(current["Specification"]["ModelName"])
    for name in gone:
        sm.wait_component(name, gone=True)
        sm.say(f"inference component {name}: deleted")
    return models


def _remove_config(sm: SageMaker, spec: DeploySpec, name: str) -> set[str]:
    """Delete an endpoint config the endpoint no longer uses; returns the models it named."""
    current = sm.describe("endpoint config", name)
    if current is None:
        return set()
    models = {v["ModelName"] for v in current.get("ProductionVariants", []) if v.get("ModelName")}
    sm.remove_owned("endpoint config", name, spec.endpoint, current)
    return models
