"""The deploy spec (``deploy.yaml``): parsed and validated once into frozen dataclasses.

The spec lives in git next to the model's ``serving.properties`` and says what runs where: the
image, the model data in S3, the environment, the instances, and optionally several inference
components sharing one endpoint. ``lmi deploy`` turns it into SageMaker calls (serving/deploy/plan.py
builds the requests); ``lmi deploy --local`` (serving/deploy/local.py) starts ``DeploySpec.containers()``
instead, each ``ModelData.uri`` fetched through the artifact module. Field-by-field reference: docs in
``properties_examples/deploy.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.deploy.environment import check_environment
from serving.deploy.fields import Reader, SpecError

# SageMaker's own constraints (botocore's service model), checked here so a typo fails in a second
# instead of after a create call or a 20-minute endpoint creation.
NAME = r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"
NAME_HINT = "1-63 letters, digits and hyphens, starting and ending with a letter or digit"
ROLE = r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-/]+"
INSTANCE_TYPE = r"ml\.[a-z0-9-]+\.[a-z0-9]+"
S3_URI = r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/\S*"
TIMEOUT_RANGE = (60, 3600)
MAX_NAME = 63


@dataclass(frozen=True)
class ModelData:
    """Where the weights are: a ``.tar.gz`` SageMaker extracts, or an S3 prefix copied as is."""

    uri: str
    compressed: bool


@dataclass(frozen=True)
class Container:
    """One container as it would run anywhere: image, model data (mounted at /opt/ml/model), env."""

    image: str
    model_data: ModelData | None
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Startup:
    """SageMaker's start-up limits, in seconds; None leaves SageMaker's default."""

    model_data_download_timeout: int | None = None
    container_startup_health_check_timeout: int | None = None


@dataclass(frozen=True)
class Component:
    """An inference component: one model with its share of the instance, in ``copies`` copies."""

    name: str
    """The InferenceComponentName: ``<endpoint>-<name in the spec>``, unique in the region."""
    container: Container
    memory_mb: int
    accelerators: float | None
    cpus: float | None
    copies: int
    startup: Startup


@dataclass(frozen=True)
class DeploySpec:
    """What to run where: one model on the endpoint's instances, or inference components sharing them."""

    endpoint: str
    role: str
    instance_type: str
    instance_count: int
    startup: Startup
    volume_size_gb: int | None = None
    region: str | None = None
    model: Container | None = None
    """The model of a single-model endpoint; None when ``components`` share the endpoint."""
    components: tuple[Component, ...] = ()
    warnings: tuple[str, ...] = ()
    """Environment keys the server does not know (probably typos); deploying still works."""

    def containers(self) -> list[tuple[str, Container]]:
        """Every container the spec runs, by name: all a local runner needs to start them."""
        if self.model is not None:
            return [(self.endpoint, self.model)]
        return [(c.name, c.container) for c in self.components]


def load_spec(path: str | Path) -> DeploySpec:
    """Read and validate ``path``; SpecError lists every problem, each naming its field."""
    import yaml

    source = str(path)
    try:
        with open(path, encoding="utf-8") as fh:  # a stream, so YAML errors name the file
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise SpecError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"not valid YAML: {exc}"]) from None
    return parse_spec(data, source)


def parse_spec(data: Any, source: str = "deploy spec") -> DeploySpec:
    """Build the spec from parsed YAML; SpecError lists every problem at once."""
    if not isinstance(data, Mapping):
        raise SpecError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    problems: list[str] = []
    warnings: list[str] = []
    top = Reader(data, "", problems)
    endpoint = top.string("endpoint", required=True, pattern=NAME, hint=NAME_HINT)
    role = top.string(
        "role", required=True, pattern=ROLE, hint="an IAM role ARN, arn:aws:iam::<account>:role/<name>"
    )
    instance_type = top.string(
        "instance_type", required=True, pattern=INSTANCE_TYPE, hint="e.g. ml.g5.2xlarge"
    )
    instance_count = top.integer("instance_count", minimum=1, default=1)
    volume = top.integer("volume_size_gb", minimum=1, maximum=512, unit=" GB")
    region = top.string("region", pattern=r"[a-z]{2}(-[a-z]+)+-\d", hint="e.g. us-west-2")
    startup = _startup(top, Startup())
    image = top.string("image", required=not top.has("components"), pattern=r"\S+", hint="no spaces")
    env = _environment(top, warnings)
    model, components = None, ()
    if top.has("components"):
        if top.has("model_data"):
            top.refuse("model_data", "set model_data per component (components[i].model_data) instead")
        components = tuple(_components(top, endpoint or "", image, env, startup, warnings))
    else:
        model = Container(image or "", _model_data(top), env)
    top.finish()
    if problems:
        raise SpecError(source, problems)
    return DeploySpec(
        endpoint=endpoint or "",
        role=role or "",
        instance_type=instance_type or "",
        instance_count=instance_count or 1,
        startup=startup,
        volume_size_gb=volume,
        region=region,
        model=model,
        components=components,
        warnings=tuple(warnings),
    )


def _startup(reader: Reader, defaults: Startup) -> Startup:
    low, high = TIMEOUT_RANGE
    download = reader.integer("model_data_download_timeout", low, high, unit=" seconds")
    health = reader.integer("container_startup_health_check_timeout", low, high, unit=" seconds")
    return Startup(
        download if download is not None else defaults.model_data_download_timeout,
        health if health is not None else defaults.container_startup_health_check_timeout,
    )


def _model_data(reader: Reader) -> ModelData | None:
    uri = reader.string("model_data", pattern=S3_URI, hint="an s3://bucket/key URI")
    if uri is None:
        return None
    if uri.endswith((".tar.gz", ".tgz")):
        return ModelData(uri, compressed=True)
    if uri.endswith("/"):
        return ModelData(uri, compressed=False)
    reader.problem(
        "model_data",
        f"{uri!r} is neither a .tar.gz archive nor a prefix: end an uncompressed S3 prefix with '/'",
    )
    return None


def _environment(
    reader: Reader, warnings: list[str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This mapping's variables over ``base``, as strings the container sees (YAML true -> "true");
    only the mapping's own values are checked, so a shared top-level mistake is named once."""
    values = reader.mapping("environment")
    own: dict[str, str] = {}
    for key, value in (values.data if values else {}).items():
        if not isinstance(key, str) or not key.isidentifier() or not key.isascii():
            reader.problem("environment", f"{key!r} is not a valid environment variable name")
        elif isinstance(value, bool):
            own[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            own[key] = str(value)
        else:
            reader.problem(
                f"environment.{key}", f"expected a string, number or boolean, got {type(value).__name__}"
            )
    check_environment(own, reader.at("environment"), reader.problems, warnings)
    env = {**(base or {}), **own}
    if len(env) > 100 or any(len(v) > 1024 for v in env.values()):
        reader.problem(
            "environment", "SageMaker allows at most 100 variables of at most 1024 characters each"
        )
    return env


def _components(
    top: Reader, endpoint: str, image: str | None, env: dict[str, str], startup: Startup, warnings: list[str]
) -> list[Component]:
    components, seen = [], set()
    for item in top.mappings("components"):
        short = item.string("name", required=True, pattern=NAME, hint=NAME_HINT)
        name = f"{endpoint}-{short}"
        if short is not None and len(name) > MAX_NAME:
            item.problem("name", f"the component's full name {name!r} is longer than {MAX_NAME} characters")
        if short is not None and short in seen:
            item.problem("name", f"{short!r} is already the name of another component")
        seen.add(short)
        own_image = item.string("image", pattern=r"\S+", hint="no spaces") or image
        if own_image is None:
            item.problem("image", "required here or at the top level")
        container = Container(own_image or "", _model_data(item), _environment(item, warnings, env))
        memory = item.integer("memory_mb", minimum=128, unit=" MB")
        if not item.has("memory_mb"):
            item.problem("memory_mb", "required: the memory SageMaker reserves for each copy, in MB")
        accelerators = item.number("accelerators", minimum=1)
        cpus = item.number("cpus", minimum=0.25)
        copies = item.integer("copies", minimum=0, default=1)
        own_startup = _startup(item, startup)
        item.finish()
        components.append(
            Component(name, container, memory or 0, accelerators, cpus, copies or 0, own_startup)
        )
    return components
