"""``lmi eval``: compare a candidate (the model with other options, or another checkpoint) with the
baseline on the same inputs, print what changed, and fail (exit 1) when a threshold is crossed.

A gate for CI before deploy: ``--max-kl``, ``--min-top1``, ``--max-ppl-increase`` and
``--max-accuracy-drop``, or the same keys in a YAML file (``--thresholds``) kept next to the deployment
config. The engines are imported inside ``run`` (``lmi`` itself stays free of torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

THRESHOLD_KEYS = ("max_kl", "min_top1", "max_ppl_increase", "max_accuracy_drop")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="measure what other options or a checkpoint cost in quality and buy in speed"
    )
    parser.add_argument("--model-dir", help="the baseline model folder (default: the default model)")
    parser.add_argument(
        "--candidate-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option.* of the candidate (e.g. quantize=int4); repeatable",
    )
    parser.add_argument("--candidate-model-dir", help="compare another checkpoint instead of (or as well)")
    parser.add_argument("--corpus", help="a text file (default: the bundled corpus)")
    parser.add_argument("--choices", help="multiple-choice JSON lines: question, choices, answer (index)")
    parser.add_argument("--dtype", default="auto", help="both sides' option.dtype unless overridden")
    parser.add_argument(
        "--thresholds", help="YAML with max_kl, min_top1, max_ppl_increase, max_accuracy_drop"
    )
    parser.add_argument("--max-kl", type=float, help="mean next-token KL divergence allowed")
    parser.add_argument("--min-top1", type=float, help="top-1 agreement required (0..1)")
    parser.add_argument(
        "--max-ppl-increase", type=float, help="relative perplexity increase allowed (0.05 = 5 %%)"
    )
    parser.add_argument(
        "--max-accuracy-drop", type=float, help="multiple-choice accuracy drop allowed (0..1)"
    )
    parser.add_argument("--skip-speed", action="store_true", help="quality only")
    parser.add_argument("--json", help="write the report here")
    parser.set_defaults(run=run)
    return parser


def thresholds(args: argparse.Namespace) -> dict[str, float]:
    """The YAML file's keys, overridden by the flags; ValueError for an unknown key."""
    limits: dict[str, float] = {}
    if args.thresholds:
        import yaml

        raw = yaml.safe_load(Path(args.thresholds).read_text()) or {}
        unknown = sorted(set(raw) - set(THRESHOLD_KEYS))
        if unknown:
            raise ValueError(f"{args.thresholds}: unknown keys {unknown}; known: {', '.join(THRESHOLD_KEYS)}")
        limits.update({key: float(value) for key, value in raw.items()})
    for key in THRESHOLD_KEYS:
        if getattr(args, key) is not None:
            limits[key] = getattr(args, key)
    return limits


def failures(report: dict[str, Any], limits: dict[str, float]) -> list[str]:
    """One line per crossed threshold, naming the metric, its value and the limit."""
    quality = report["quality"]
    checks = {
        "max_kl": ("kl_mean", quality["kl_mean"], lambda v, lim: v <= lim),
        "min_top1": ("top1_agreement", quality["top1_agreement"], lambda v, lim: v >= lim),
        "max_ppl_increase": ("perplexity_increase", quality["perplexity_increase"], lambda v, lim: v <= lim),
    }
    if "accuracy_drop" in quality:
        checks["max_accuracy_drop"] = ("accuracy_drop", quality["accuracy_drop"], lambda v, lim: v <= lim)
    out = []
    for key, limit in limits.items():
        if key in checks:
            name, value, ok = checks[key]
            if not ok(value, limit):
                out.append(f"{name} = {value:.4g} crosses {key} = {limit:g}")
    return out


def candidate_fields(pairs: list[str]) -> dict[str, Any]:
    """--candidate-option KEY=VALUE as EngineConfig fields, typed by the option declaration."""
    from serving.options import OPTIONS, parse_value

    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        spec = OPTIONS.get(f"option.{key.strip()}")
        if not sep or spec is None:
            raise ValueError(f"--candidate-option {pair!r}: expected KEY=VALUE with KEY an option.* name")
        fields[spec.name] = parse_value(spec, f"option.{spec.name}", value.strip(), "--candidate-option")
    return fields


def run(args: argparse.Namespace) -> int:
    """0: every threshold holds; 1: one is crossed; 2: bad arguments or a model that cannot load."""
    import dataclasses

    from engines.base import EngineConfig, EngineLoadError
    from engines.device import resolve_device
    from engines.evaluate.quality import (
        DEFAULT_CHOICES,
        DEFAULT_CORPUS,
        choice_accuracy,
        compare_on_corpus,
        read_choices,
    )
    from engines.evaluate.speed import PeakMemory, disk_bytes, measure_speed
    from engines.rolling.factory import create_rolling_engine
    from serving.errors import ConfigError

    try:
        limits = thresholds(args)
        extra = candidate_fields(args.candidate_option)
        corpus = Path(args.corpus or DEFAULT_CORPUS).read_text()
        items = read_choices(Path(args.choices or DEFAULT_CHOICES))
    except (OSError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not extra and not args.candidate_model_dir:
        print("error: give --candidate-option KEY=VALUE and/or --candidate-model-dir", file=sys.stderr)
        return 2
    base_dir = args.model_dir
    if base_dir is None:
        from engines.hf.default_model import ensure_default_model

        base_dir = ensure_default_model()
    base_config = EngineConfig(
        model_path=base_dir, dtype=args.dtype, max_rolling_batch_size=32, max_model_len=512
    )
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(EngineConfig)})
    if unknown:
        print(f"error: {unknown} are not engine options the candidate can change", file=sys.stderr)
        return 2
    candidate_config = dataclasses.replace(
        base_config, model_path=args.candidate_model_dir or base_dir, **extra
    )
    engines, memory = {}, {}
    try:
        for side, config in (("baseline", base_config), ("candidate", candidate_config)):
            tracker = PeakMemory(resolve_device(config.device))
            tracker.start()
            engines[side] = create_rolling_engine(config)
            memory[side] = (tracker.peak(), tracker.current())  # loading's peak, then what stays resident
    except (EngineLoadError, NotImplementedError, ValueError) as exc:
        print(f"error: the {side} cannot load: {exc}", file=sys.stderr)
        return 2
    base, candidate = engines["baseline"], engines["candidate"]
    from engines.quant.linear import decode_numerics

    with decode_numerics():  # quantized projections score as they decode, not as they prefill
        quality = compare_on_corpus(base.model, candidate.model, base.tokenizer, corpus)
        quality["accuracy_base"] = choice_accuracy(base.model, base.tokenizer, items)
        quality["accuracy_candidate"] = choice_accuracy(candidate.model, candidate.tokenizer, items)
    quality["accuracy_drop"] = quality["accuracy_base"] - quality["accuracy_candidate"]
    report: dict[str, Any] = {
        "baseline": {"model_dir": base_dir, "options": {"dtype": args.dtype}},
        "candidate": {
            "model_dir": candidate_config.model_path,
            "options": {k: str(v) for k, v in extra.items()},
        },
        "quality": quality,
        "choices": len(items),
    }
    if not args.skip_speed:
        for (side, engine), config in zip(engines.items(), (base_config, candidate_config), strict=True):
            load_peak, resident = memory[side]
            during = PeakMemory(engine.model.device)
            during.start()
            report[side]["speed"] = measure_speed(engine)
            running = during.peak()
            known = None not in (load_peak, resident, running)
            report[side]["speed"]["peak_memory_bytes"] = max(load_peak, resident + running) if known else None
            report[side]["speed"]["disk_bytes"] = disk_bytes(config.model_path)
    report["failures"] = failures(report, limits)
    report["thresholds"] = limits
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["failures"] else 0


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def render(report: dict[str, Any]) -> str:
    quality = report["quality"]
    lines = [
        f"baseline  {report['baseline']['model_dir']}",
        f"candidate {report['candidate']['model_dir']} {report['candidate']['options']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| positions scored | {quality['positions']} |",
        f"| next-token KL mean / p99 | {quality['kl_mean']:.4f} / {quality['kl_p99']:.4f} |",
        f"| top-1 agreement | {quality['top1_agreement']:.1%} |",
        f"| perplexity baseline / candidate | {quality['perplexity_base']:.3f} / "
        f"{quality['perplexity_candidate']:.3f} ({quality['perplexity_increase']:+.2%}) |",
        f"| accuracy on {report['choices']} choices baseline / candidate | {quality['accuracy_base']:.1%} / "
        f"{quality['accuracy_candidate']:.1%} |",
    ]
    if "speed" in report["baseline"]:
        base, cand = report["baseline"]["speed"], report["candidate"]["speed"]
        for key in sorted(base):
            lines.append(f"| {key} baseline / candidate | {_figure(base[key])} / {_figure(cand.get(key))} |")
    lines.append("")
    lines += [f"FAIL {line}" for line in report["failures"]] or ["every threshold holds"]
    return "\n".join(lines)
