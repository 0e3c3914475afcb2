"""deploy.yaml parsing: typed values, defaults, and validation errors that name every bad field."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from support import ROOT

from serving.cli import build_parser
from serving.deploy import ModelData, SpecError, Startup, load_spec, parse_spec

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BASE = {"endpoint": "demo", "role": ROLE, "image": "repo/lmi:1", "instance_type": "ml.g5.xlarge"}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "deploy.yaml")
    return info.value.problems


def test_minimal_single_model_spec_has_defaults():
    spec = parse_spec(BASE)
    assert (spec.endpoint, spec.instance_count, spec.volume_size_gb, spec.region) == ("demo", 1, None, None)
    assert spec.startup == Startup(None, None)
    assert spec.model is not None
    assert spec.model.model_data is None
    assert not spec.components
    assert spec.containers() == [("demo", spec.model)]


@pytest.mark.parametrize(
    ("uri", "compressed"),
    [
        ("s3://bucket/models/m.tar.gz", True),
        ("s3://bucket/a/m.tgz", True),
        ("s3://bucket/models/llama/", False),
    ],
)
def test_model_data_is_an_archive_or_a_prefix(uri, compressed):
    spec = parse_spec({**BASE, "model_data": uri})
    assert spec.model.model_data == ModelData(uri, compressed)


def test_environment_values_become_the_strings_the_container_sees():
    env = {
        "OPTION_ROLLING_BATCH": "auto",
        "OPTION_MAX_ROLLING_BATCH_SIZE": 32,
        "OPTION_TRUST_REMOTE_CODE": True,
    }
    spec = parse_spec({**BASE, "environment": env})
    assert spec.model.environment == {
        "OPTION_ROLLING_BATCH": "auto",
        "OPTION_MAX_ROLLING_BATCH_SIZE": "32",
        "OPTION_TRUST_REMOTE_CODE": "true",
    }


def test_components_inherit_and_override_top_level_values():
    spec = parse_spec(
        {
            **BASE,
            "environment": {"SERVING_LOG_LEVEL": "info", "OPTION_DTYPE": "fp16"},
            "model_data_download_timeout": 600,
            "components": [
                {"name": "a", "memory_mb": 1024, "environment": {"OPTION_DTYPE": "bf16"}},
                {
                    "name": "b",
                    "image": "other:2",
                    "memory_mb": 2048,
                    "accelerators": 2,
                    "cpus": 0.5,
                    "copies": 3,
                    "model_data_download_timeout": 1200,
                    "model_data": "s3://bkt/b/",
                },
            ],
        }  # fmt: skip
    )
    a, b = spec.components
    assert spec.model is None
    assert (a.name, a.container.image, a.copies, a.accelerators, a.cpus) == (
        "demo-a",
        "repo/lmi:1",
        1,
        None,
        None,
    )
    assert a.container.environment == {"SERVING_LOG_LEVEL": "info", "OPTION_DTYPE": "bf16"}
    assert a.startup == Startup(600, None)
    assert (b.name, b.container.image, b.memory_mb, b.accelerators, b.cpus, b.copies) == (
        "demo-b", "other:2", 2048, 2.0, 0.5, 3,
    )  # fmt: skip
    assert b.startup == Startup(1200, None)
    assert b.container.model_data == ModelData("s3://bkt/b/", False)
    assert [name for name, _ in spec.containers()] == ["demo-a", "demo-b"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"endpoint": "my_endpoint"}, "endpoint: 'my_endpoint' is not valid"),
        ({"endpoint": None}, "endpoint: required"),
        ({"role": "my-role"}, "role: 'my-role' is not valid: an IAM role ARN"),
        ({"instance_type": "g5.xlarge"}, "instance_type: 'g5.xlarge' is not valid"),
        ({"instance_count": 0}, "instance_count: expected an integer >= 1, got int 0"),
        ({"instance_count": "2"}, "instance_count: expected an integer >= 1, got str '2'"),
        ({"volume_size_gb": 1000}, "volume_size_gb: expected an integer from 1 to 512 GB"),
        (
            {"model_data_download_timeout": 30},
            "model_data_download_timeout: expected an integer from 60 to 3600",
        ),
        (
            {"container_startup_health_check_timeout": True},
            "container_startup_health_check_timeout: expected",
        ),
        ({"model_data": "s3://bucket/model.bin"}, "model_data: 's3://bucket/model.bin' is neither a .tar.gz"),
        (
            {"model_data": "/local/folder/"},
            "model_data: '/local/folder/' is not valid: an s3://bucket/key URI",
        ),
        ({"environment": ["A=1"]}, "environment: expected a mapping of keys to values, got list"),
        (
            {"environment": {"BAD-NAME": "1"}},
            "environment: 'BAD-NAME' is not a valid environment variable name",
        ),
        (
            {"environment": {"OPTION_X": {"a": 1}}},
            "environment.OPTION_X: expected a string, number or boolean",
        ),
        ({"instance_cout": 2}, "instance_cout: unknown key (did you mean 'instance_count'?)"),
        ({"region": "Oregon"}, "region: 'Oregon' is not valid: e.g. us-west-2"),
    ],
)
def test_each_invalid_field_is_named(change, expected):
    problems = problems_of({**BASE, **change})
    assert any(p.startswith(expected) for p in problems), problems


def test_environment_values_are_checked_by_the_servers_option_table():
    problems = problems_of({**BASE, "environment": {"OPTION_MAX_ROLLING_BATCH_SIZE": "lots"}})
    assert len(problems) == 1
    assert problems[0].startswith("environment: Invalid value 'lots' for option.max_rolling_batch_size")
    assert "OPTION_MAX_ROLLING_BATCH_SIZE" in problems[0]


def test_unknown_environment_keys_are_warnings_with_a_suggestion():
    spec = parse_spec({**BASE, "environment": {"OPTION_ROLING_BATCH": "auto", "HF_TOKEN": "x"}})
    assert len(spec.warnings) == 1
    assert "OPTION_ROLING_BATCH" in spec.warnings[0]
    assert "'option.rolling_batch'" in spec.warnings[0]


def test_every_problem_is_reported_at_once_with_component_paths():
    data = {
        **BASE,
        "model_data": "s3://bucket/m.tar.gz",
        "components": [
            {"name": "a", "memory_mb": 64, "copies": True, "gpus": 1},
            {"name": "a", "memory_mb": 1024, "accelerators": 0.5},
            {"name": "c"},
            "not-a-mapping",
        ],
    }
    problems = problems_of(data)
    assert problems == [
        "model_data: set model_data per component (components[i].model_data) instead",
        "components[3]: expected a mapping, got str 'not-a-mapping'",
        "components[0].memory_mb: expected an integer >= 128 MB, got int 64",
        "components[0].copies: expected an integer >= 0, got bool True",
        "components[0].gpus: unknown key (did you mean 'cpus'?)",
        "components[1].name: 'a' is already the name of another component",
        "components[1].accelerators: expected a number >= 1, got float 0.5",
        "components[2].memory_mb: required: the memory SageMaker reserves for each copy, in MB",
    ]


def test_component_full_names_must_fit_sagemakers_limit():
    problems = problems_of(
        {**BASE, "endpoint": "e" * 50, "components": [{"name": "x" * 20, "memory_mb": 128}]}
    )
    assert problems == [f"components[0].name: the component's full name {'e' * 50 + '-' + 'x' * 20!r} "
                        "is longer than 63 characters"]  # fmt: skip


def test_components_need_an_image_somewhere():
    data = {k: v for k, v in BASE.items() if k != "image"}
    problems = problems_of({**data, "components": [{"name": "a", "memory_mb": 256}]})
    assert problems == ["components[0].image: required here or at the top level"]
    assert problems_of(data) == ["image: required"]


def test_load_spec_names_the_file_in_yaml_and_read_errors(tmp_path):
    bad = tmp_path / "deploy.yaml"
    bad.write_text("endpoint: [\n")
    with pytest.raises(SpecError, match="not valid YAML") as info:
        load_spec(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a mapping at the top level, got list"):
        load_spec(bad)


@pytest.mark.parametrize("name", ["deploy.yaml", "deploy-components.yaml"])
def test_shipped_examples_are_valid(name):
    spec = load_spec(ROOT / "properties_examples" / name)
    assert spec.containers()
    assert not spec.warnings


def test_cli_exits_2_and_prints_every_problem(tmp_path, capsys):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({**BASE, "instance_count": -1, "colour": "red"}))
    args = build_parser().parse_args(["deploy", "--spec", str(path)])
    assert args.run(args) == 2
    err = capsys.readouterr().err
    assert f"{path}: invalid deploy spec" in err
    assert "instance_count: expected an integer >= 1" in err
    assert "colour: unknown key" in err


def test_yaml_text_round_trip(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            endpoint: demo
            role: {ROLE}
            image: repo/lmi:1
            instance_type: ml.g5.xlarge
            environment:
              OPTION_ENABLE_PREFIX_CACHING: false
              SERVING_JOB_QUEUE_SIZE: 100
        """)
    )
    assert load_spec(path).model.environment == {
        "OPTION_ENABLE_PREFIX_CACHING": "false",
        "SERVING_JOB_QUEUE_SIZE": "100",
    }
