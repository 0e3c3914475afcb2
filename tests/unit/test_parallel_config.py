"""The parallel settings as the server reads them: DJL/SageMaker/torchrun variables, SageMaker's host
list, and the start-up checks of a multi-node group."""

from __future__ import annotations

import json

import pytest

from serving.config import load_config
from serving.errors import ConfigError


def settings(environ: dict[str, str]) -> dict:
    return load_config(None, environ).settings


def test_degrees_from_djl_and_sagemaker_variables():
    got = settings({"TENSOR_PARALLEL_DEGREE": "max", "PIPELINE_PARALLEL_DEGREE": "2"})
    assert (got["tensor_parallel_degree"], got["pipeline_parallel_degree"]) == (0, 2)  # 0: every GPU
    assert settings({"SM_NUM_GPUS": "4"})["tensor_parallel_degree"] == 4
    assert settings({})["tensor_parallel_degree"] == 1


def test_torchrun_variables_set_the_rendezvous():
    got = settings({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"})
    assert (got["nnodes"], got["node_rank"], got["master_addr"], got["master_port"]) == (
        2,
        1,
        "10.0.0.5",
        29500,
    )


def test_sagemaker_host_list_makes_the_nodes(tmp_path):
    path = tmp_path / "resourceconfig.json"
    path.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2", "algo-3"]}))
    got = settings({"SERVING_RESOURCE_CONFIG": str(path)})
    assert (got["nnodes"], got["node_rank"], got["master_addr"], got["master_port"]) == (
        3,
        1,
        "algo-1",
        29500,
    )
    one_host = tmp_path / "one.json"
    one_host.write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    assert settings({"SERVING_RESOURCE_CONFIG": str(one_host)})["nnodes"] == 1


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "node_rank=2 is not below",
        ),
        ({"NNODES": "2"}, "needs option.master_addr and option.master_port"),
        ({"TENSOR_PARALLEL_DEGREE": "2", "WORLD_SIZE": "4"}, "WORLD_SIZE=4 but tensor_parallel_degree x"),
        ({"TENSOR_PARALLEL_DEGREE": "0x2"}, "option.tensor_parallel_degree"),
    ],
)
def test_a_bad_group_fails_start_up_naming_the_fix(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ)
