"""``lmi eval``: the comparison it reports and the exit code its thresholds give (0 held, 1 crossed,
2 unusable arguments), on a tiny seeded Llama with an int4 candidate."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from support import tiny_model_script

from engines.evaluate.speed import PeakMemory
from serving.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


def lmi_eval(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    return exit_info.value.code


def test_the_same_model_compares_equal_and_holds_strict_thresholds(tiny, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = lmi_eval(
        "--model-dir", str(tiny), "--candidate-model-dir", str(tiny), "--dtype", "fp32", "--skip-speed",
        "--max-kl", "1e-6", "--min-top1", "1.0", "--max-ppl-increase", "0", "--max-accuracy-drop", "0",
        "--json", str(report),
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    quality = json.loads(report.read_text())["quality"]
    assert quality["kl_mean"] < 1e-6
    assert quality["top1_agreement"] == 1.0
    assert quality["positions"] > 100
    assert "every threshold holds" in capsys.readouterr().out


def test_a_crossed_threshold_exits_1_naming_the_metric(tiny, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = lmi_eval(
        "--model-dir", str(tiny), "--candidate-option", "quantize=int4", "--dtype", "fp32",
        "--max-kl", "0", "--min-top1", "0", "--json", str(report),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL kl_mean = " in out
    assert "min_top1" not in out.split("FAIL", 1)[1]  # a threshold that holds is not reported
    data = json.loads(report.read_text())
    assert data["quality"]["kl_mean"] > 0
    assert data["candidate"]["options"] == {"quantize": "int4"}
    speed = data["candidate"]["speed"]
    assert speed["decode_tok_s_batch1"] > 0
    assert speed["weight_bytes"] < data["baseline"]["speed"]["weight_bytes"]  # 4-bit projections
    for side in ("baseline", "candidate"):  # measured (a tiny model's pages may reuse freed heap: >= 0)
        assert data[side]["speed"]["peak_memory_bytes"] >= 0
    assert "peak_memory_bytes baseline / candidate" in out


def test_thresholds_from_a_yaml_file_and_flags_over_them(tiny, tmp_path, capsys):
    limits = tmp_path / "eval.yaml"
    limits.write_text("max_kl: 0.0\nmin_top1: 0.0\n")
    args = [
        "--model-dir",
        str(tiny),
        "--candidate-option",
        "quantize=int4",
        "--dtype",
        "fp32",
        "--skip-speed",
    ]
    assert lmi_eval(*args, "--thresholds", str(limits)) == 1
    assert lmi_eval(*args, "--thresholds", str(limits), "--max-kl", "1e9") == 0
    limits.write_text("max_kl: 0.1\nmax_typo: 1\n")
    assert lmi_eval(*args, "--thresholds", str(limits)) == 2
    assert "unknown keys ['max_typo']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--candidate-option", "quantize=int3"], "option.quantize"),
        (["--candidate-option", "no_such_option=1"], "expected KEY=VALUE with KEY an option.* name"),
        ([], "give --candidate-option"),
    ],
)
def test_unusable_arguments_exit_2(tiny, capsys, argv, message):
    assert lmi_eval("--model-dir", str(tiny), "--skip-speed", *argv) == 2
    assert message in capsys.readouterr().err


def test_a_malformed_choices_file_names_its_line(tiny, tmp_path, capsys):
    choices = tmp_path / "choices.jsonl"
    choices.write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "answer": 0}\n'
    )
    code = lmi_eval(
        "--model-dir", str(tiny), "--candidate-option", "quantize=int8", "--choices", str(choices)
    )
    assert code == 2
    assert f"{choices}:2: expected question, choices and answer" in capsys.readouterr().err


def test_peak_memory_is_not_hidden_by_earlier_garbage_freed_later():
    """Cyclic garbage left by an earlier phase is collected at start(), not during the phase, where
    the fall in resident memory would hide the phase's own growth (a full test run measured 0)."""
    cycle: list = [torch.ones(128 * 2**20 // 4)]
    cycle.append(cycle)  # only the cycle collector frees it
    del cycle
    tracker = PeakMemory("cpu")
    tracker.start()
    gc.collect()  # as the collector may run at the phase's first allocations
    block = torch.ones(64 * 2**20 // 4)
    peak = tracker.peak()
    assert peak is not None
    assert 60 * 2**20 <= peak < 90 * 2**20
    del block


def test_peak_memory_sees_an_allocation_and_not_what_came_before():
    """The resident high-water mark from start(): 64 MiB touched counts (glibc maps an allocation that
    large afresh), memory taken and released before start() does not."""
    before = torch.ones(96 * 2**20 // 4)
    del before
    tracker = PeakMemory("cpu")
    tracker.start()
    block = torch.ones(64 * 2**20 // 4)
    peak = tracker.peak()
    assert peak is not None
    assert 60 * 2**20 <= peak < 90 * 2**20
    assert tracker.current() >= 60 * 2**20
    del block
