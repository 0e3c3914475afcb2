"""The SageMaker requests a spec stands for, as boto3 keyword arguments, named by their content.

SageMaker models and endpoint configs cannot change once created, so each is named after a digest of
its own request: the same spec gives the same names (a re-run finds them and creates nothing), a
changed spec gives new names (created beside the old ones, switched to, then the old ones removed).
Every created resource carries the ``OWNER_TAG`` so clean-up deletes only what ``lmi deploy`` made.
Pure functions: ``lmi deploy --dry-run`` prints exactly what ``apply`` would send.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serving.deploy.spec import MAX_NAME, Component, Container, DeploySpec, Startup

VARIANT = "AllTraffic"
OWNER_TAG = "lmi-deploy:endpoint"
DIGEST_LEN = 8


@dataclass(frozen=True)
class Plan:
    """The create requests: models first, then the endpoint config, then inference components."""

    models: tuple[dict[str, Any], ...]
    endpoint_config: dict[str, Any]
    components: tuple[dict[str, Any], ...]

    @property
    def config_name(self) -> str:
        return self.endpoint_config["EndpointConfigName"]

    @property
    def model_names(self) -> set[str]:
        return {m["ModelName"] for m in self.models}


def owner_tags(spec: DeploySpec) -> list[dict[str, str]]:
    return [{"Key": OWNER_TAG, "Value": spec.endpoint}]


def content_name(base: str, request: Mapping[str, Any]) -> str:
    """``<base>-<8 hex digits of the request>``, cut to SageMaker's 63 characters."""
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:DIGEST_LEN]
    return f"{base[: MAX_NAME - DIGEST_LEN - 1].rstrip('-')}-{digest}"


def _container(container: Container) -> dict[str, Any]:
    out: dict[str, Any] = {"Image": container.image}
    data = container.model_data
    if data is not None and data.compressed:
        out["ModelDataUrl"] = data.uri
    elif data is not None:
        source = {"S3Uri": data.uri, "S3DataType": "S3Prefix", "CompressionType": "None"}
        out["ModelDataSource"] = {"S3DataSource": source}
    if container.environment:
        out["Environment"] = dict(container.environment)
    return out


def model_request(spec: DeploySpec, base: str, container: Container) -> dict[str, Any]:
    request = {"ExecutionRoleArn": spec.role, "PrimaryContainer": _container(container)}
    return {"ModelName": content_name(base, request), **request, "Tags": owner_tags(spec)}


def _startup_fields(startup: Startup) -> dict[str, int]:
    fields = {
        "ModelDataDownloadTimeoutInSeconds": startup.model_data_download_timeout,
        "ContainerStartupHealthCheckTimeoutInSeconds": startup.container_startup_health_check_timeout,
    }
    return {key: value for key, value in fields.items() if value is not None}


def endpoint_config_request(spec: DeploySpec, model_name: str | None) -> dict[str, Any]:
    """One variant; with inference components it names no model and the config carries the role."""
    variant: dict[str, Any] = {
        "VariantName": VARIANT,
        "InstanceType": spec.instance_type,
        "InitialInstanceCount": spec.instance_count,
        **_startup_fields(spec.startup),
    }
    if model_name is not None:
        variant["ModelName"] = model_name
    if spec.volume_size_gb is not None:
        variant["VolumeSizeInGB"] = spec.volume_size_gb
    request: dict[str, Any] = {"ProductionVariants": [variant]}
    if model_name is None:
        request["ExecutionRoleArn"] = spec.role
    name = content_name(spec.endpoint, request)
    return {"EndpointConfigName": name, **request, "Tags": owner_tags(spec)}


def component_specification(component: Component, model_name: str) -> dict[str, Any]:
    """The ``Specification`` of CreateInferenceComponent (compared field by field on re-runs)."""
    needs: dict[str, Any] = {"MinMemoryRequiredInMb": component.memory_mb}
    if component.accelerators is not None:
        needs["NumberOfAcceleratorDevicesRequired"] = component.accelerators
    if component.cpus is not None:
        needs["NumberOfCpuCoresRequired"] = component.cpus
    specification: dict[str, Any] = {"ModelName": model_name, "ComputeResourceRequirements": needs}
    startup = _startup_fields(component.startup)
    if startup:
        specification["StartupParameters"] = startup
    return specification


def component_request(spec: DeploySpec, component: Component, model_name: str) -> dict[str, Any]:
    return {
        "InferenceComponentName": component.name,
        "EndpointName": spec.endpoint,
        "VariantName": VARIANT,
        "Specification": component_specification(component, model_name),
        "RuntimeConfig": {"CopyCount": component.copies},
        "Tags": owner_tags(spec),
    }


def plan(spec: DeploySpec) -> Plan:
    if spec.model is not None:
        model = model_request(spec, spec.endpoint, spec.model)
        return Plan((model,), endpoint_config_request(spec, model["ModelName"]), ())
    models, components = [], []
    for component in spec.components:
        model = model_request(spec, component.name, component.container)
        models.append(model)
        components.append(component_request(spec, component, model["ModelName"]))
    return Plan(tuple(models), endpoint_config_request(spec, None), tuple(components))
