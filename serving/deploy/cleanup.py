"""``lmi deploy --delete``: remove the endpoint, its inference components, and what lmi deploy made.

The endpoint named by the spec and every component on it are deleted; endpoint configs and models
only when they carry lmi deploy's owner tag for this endpoint, so a model shared with something
else survives. Re-running finds nothing and says so.
"""

from __future__ import annotations

from serving.deploy.plan import plan
from serving.deploy.sagemaker import SageMaker
from serving.deploy.spec import DeploySpec


def delete(spec: DeploySpec, sm: SageMaker) -> None:
    p = plan(spec)
    models, configs = set(p.model_names), {p.config_name}
    endpoint = sm.settle_endpoint(spec.endpoint)
    found = endpoint is not None
    if endpoint is not None:
        configs.add(endpoint["EndpointConfigName"])
        if spec.components or _hosts_components(sm, endpoint["EndpointConfigName"]):
            models |= _delete_components(sm, spec.endpoint)
        sm.delete("endpoint", spec.endpoint)
        sm.wait_endpoint_deleted(spec.endpoint)
    for name in sorted(configs):
        current = sm.describe("endpoint config", name)
        if current is not None:
            models |= {v["ModelName"] for v in current.get("ProductionVariants", []) if v.get("ModelName")}
            found = sm.remove_owned("endpoint config", name, spec.endpoint, current) or found
    for name in sorted(models):
        found = sm.remove_owned("model", name, spec.endpoint) or found
    if not found:
        sm.say(f"endpoint {spec.endpoint}: nothing to delete")


def _hosts_components(sm: SageMaker, config: str) -> bool:
    """An endpoint config whose variant names no model serves inference components."""
    current = sm.describe("endpoint config", config)
    variants = current.get("ProductionVariants", []) if current else []
    return any(not v.get("ModelName") for v in variants)


def _delete_components(sm: SageMaker, endpoint: str) -> set[str]:
    """Delete every component on the endpoint (it cannot go while they exist); returns their models."""
    names, models = sm.list_components(endpoint), set()
    for name in names:
        current = sm.describe("inference component", name)
        if current is not None:
            models.add(current["Specification"]["ModelName"])
            sm.delete("inference component", name)
    for name in names:
        sm.wait_component(name, gone=True)
        sm.say(f"inference component {name}: deleted")
    return models
