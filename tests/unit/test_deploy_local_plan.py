"""lmi deploy --local without a container engine: the plan, the fingerprints, the keep/replace/stop
decisions against a fake engine, model-data cache keys, and the flags that do not fit together."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from serving.artifacts.s3_client import S3Object
from serving.cli import main
from serving.container import run
from serving.container.engine import ContainerError
from serving.deploy import Startup, local, parse_spec
from serving.deploy.model_data import content_identity

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BASE = {"endpoint": "demo", "role": ROLE, "image": "repo/lmi:1", "instance_type": "ml.c6i.xlarge"}
COMPONENTS = {
    **BASE,
    "environment": {"OPTION_DTYPE": "fp32"},
    "container_startup_health_check_timeout": 600,
    "components": [
        {"name": "a", "memory_mb": 1024, "model_data": "s3://bucket/a/model.tar.gz"},
        {"name": "b", "memory_mb": 1024, "model_data": "s3://bucket/b/", "model_data_download_timeout": 120},
    ],
}


def test_a_single_model_runs_as_the_endpoint_on_the_given_port():
    (only,) = local.plan(parse_spec({**BASE, "model_data": "s3://bucket/m/"}), 9000)
    assert (only.name, only.port, only.container_name) == ("demo", 9000, "lmi-deploy-demo")
    assert only.container.model_data.uri == "s3://bucket/m/"


def test_components_get_consecutive_ports_and_their_own_startup_limits():
    planned = local.plan(parse_spec(COMPONENTS), 8080)
    assert [(p.name, p.port) for p in planned] == [("demo-a", 8080), ("demo-b", 8081)]
    assert planned[0].startup == Startup(None, 600)
    assert planned[1].startup == Startup(120, 600)
    assert all(p.container.environment == {"OPTION_DTYPE": "fp32"} for p in planned)
    assert [p.port for p in local.plan(parse_spec(COMPONENTS), 0)] == [0, 0]  # each a free port


def test_ports_past_65535_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="2 containers need ports up to 65536"):
        local.plan(parse_spec(COMPONENTS), 65535)


def test_the_fingerprint_follows_what_would_run():
    (planned,) = local.plan(parse_spec(BASE), 8080)
    labels = planned.labels("sha256:1")
    assert labels[local.ENDPOINT_LABEL] == "demo"
    assert labels[local.NAME_LABEL] == "demo"
    changed_env = replace(planned, container=replace(planned.container, environment={"OPTION_DTYPE": "bf16"}))
    variants = [
        planned.labels("sha256:2"),  # the image was rebuilt under the same tag
        changed_env.labels("sha256:1"),
        replace(planned, model_dir=Path("/cache/other")).labels("sha256:1"),
        replace(planned, port=9000).labels("sha256:1"),
    ]
    prints = {v[local.FINGERPRINT_LABEL] for v in variants}
    assert len(prints) == 4
    assert labels[local.FINGERPRINT_LABEL] not in prints
    assert planned.labels("sha256:1") == labels


def test_model_data_cache_keys_change_with_the_s3_objects_not_their_order():
    a = S3Object("m/config.json", "config.json", 10, "e1")
    b = S3Object("m/model.safetensors", "model.safetensors", 99, "e2")
    key = content_identity("s3://bucket/m/", [a, b])
    assert key.startswith("s3://bucket/m/#sagemaker-layout-")
    assert content_identity("s3://bucket/m/", [b, a]) == key
    assert content_identity("s3://bucket/m/", [a, replace(b, etag="e3")]) != key
    assert content_identity("s3://bucket/m/", [a]) != key


class FakeContainer:
    def __init__(self, name: str, labels: dict[str, str], status: str = "running") -> None:
        self.name, self.labels, self.status, self.id = name, labels, status, f"id-{name}"


class FakeEngine:
    """containers.list / images.get, with run.start, run.stop and run.wait_ready recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_ready: bool = False) -> None:
        self.running: list[FakeContainer] = []
        self.events: list[str] = []
        self.containers, self.images = self, self
        self.fail_ready = fail_ready
        monkeypatch.setattr(run, "start", self.start)
        monkeypatch.setattr(run, "stop", self.stop)
        monkeypatch.setattr(run, "wait_ready", self.wait_ready)
        monkeypatch.setattr(run, "published_url", lambda c: "http://127.0.0.1:1")

    def list(self, all: bool, filters: dict[str, str]) -> list[FakeContainer]:  # noqa: A002 - docker's name
        key, _, value = filters["label"].partition("=")
        return [c for c in self.running if c.labels.get(key) == value]

    def get(self, image: str) -> FakeContainer:
        return FakeContainer(image, {})

    def start(self, client, image, port, model_dir, env, name, labels) -> FakeContainer:
        self.events.append(f"start {name}")
        self.running.append(FakeContainer(name, labels))
        return self.running[-1]

    def stop(self, container: FakeContainer, timeout_s: int = 30) -> int:
        self.events.append(f"stop {container.name}")
        self.running.remove(container)
        return 0

    def wait_ready(self, container: FakeContainer, url: str, timeout_s: float) -> float:
        if self.fail_ready and container.name.endswith("-b"):
            raise ContainerError("The container exited during start-up")
        return 0.1


def up(engine: FakeEngine, spec: dict, messages: list[str]) -> list[str]:
    engine.events.clear()
    local.up(engine, local.plan(parse_spec(spec), 8080), 60, messages.append)
    return sorted(engine.events)


def test_rerunning_keeps_what_is_unchanged_and_replaces_or_stops_the_rest(monkeypatch):
    engine, said = FakeEngine(monkeypatch), []
    assert up(engine, COMPONENTS, said) == ["start lmi-deploy-demo-a", "start lmi-deploy-demo-b"]
    assert up(engine, COMPONENTS, said) == []
    assert "demo-a: unchanged, running at http://127.0.0.1:1" in said
    changed = {**COMPONENTS, "components": [{**COMPONENTS["components"][0], "environment": {"X_Y": "1"}}]}
    assert up(engine, changed, said) == [
        "start lmi-deploy-demo-a",
        "stop lmi-deploy-demo-a",
        "stop lmi-deploy-demo-b",
    ]
    assert "demo-b: no longer in the spec; stopping it" in said
    assert [c.name for c in engine.running] == ["lmi-deploy-demo-a"]


def test_a_failed_start_stops_every_container_it_started(monkeypatch):
    engine = FakeEngine(monkeypatch, fail_ready=True)
    with pytest.raises(ContainerError, match="exited during start-up"):
        up(engine, COMPONENTS, [])
    assert engine.running == []


def test_delete_and_invoke_find_only_this_endpoints_containers(monkeypatch):
    engine, said = FakeEngine(monkeypatch), []
    up(engine, COMPONENTS, said)
    up(engine, {**BASE, "endpoint": "other"}, said)
    assert local.local_url(engine, "demo", "demo-b") == "http://127.0.0.1:1"
    with pytest.raises(ContainerError, match="lmi deploy --spec <file> --local --detach"):
        local.local_url(engine, "demo", "demo")
    assert local.delete(engine, "demo", said.append) == 2
    assert [c.name for c in engine.running] == ["lmi-deploy-other"]
    assert local.delete(engine, "demo", said.append) == 0
    assert said[-1] == "no local containers of demo: nothing to delete"


@pytest.fixture
def spec_file(tmp_path):
    import yaml

    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deploy", "--port", "9000"], "--port and --detach apply to --local runs only: add --local"),
        (["deploy", "--detach"], "--port and --detach apply to --local runs only"),
        (["deploy", "--local", "--dry-run"], "--dry-run previews SageMaker requests; --local sends none"),
        (["invoke", "--url", "http://127.0.0.1:1", "--local", "hi"], "--local needs --spec"),
        (["invoke", "--local", "--component", "x", "hi"], "demo has no inference components in the spec"),
    ],
)
def test_flags_that_do_not_fit_exit_2_with_the_fix(spec_file, capsys, argv, message):
    if "--url" not in argv:
        argv = [argv[0], "--spec", str(spec_file), *argv[1:]]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_port_out_of_range_is_an_argument_error(spec_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["deploy", "--spec", str(spec_file), "--local", "--port", "70000"])
    assert info.value.code == 2
    assert "must be a TCP port" in capsys.readouterr().err
