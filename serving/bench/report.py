"""Output: one JSON line (for scripts; stable keys, ``schema`` versioned) and a table (for people)."""

from __future__ import annotations

import json
from typing import Any

SCHEMA = "lmi-bench/1"


def add_baseline_ratios(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> None:
    """``vs_baseline``: server requests/min over the naive baseline's; None without a baseline."""
    base = (baseline or {}).get("requests_per_min") or 0
    for row in rows:
        row["vs_baseline"] = round(row["requests_per_min"] / base, 2) if base else None


def record(config: dict[str, Any], rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> dict:
    return {"schema": SCHEMA, "config": config, "baseline": baseline, "rows": rows}


def json_line(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dist(summary: dict[str, float | None]) -> str:
    return "/".join(
        _num(summary[k], 0 if (summary[k] or 0) >= 100 else 1) for k in ("mean", "p50", "p90", "p99")
    )


def _load(row: dict[str, Any]) -> str:
    return f"c={row['concurrency']}" if row["mode"] == "closed" else f"rate={row['rate']:g}/s"


HEADERS = ("load", "reqs", "ok", "err", "req/min", "out tok/s", "TTFT ms", "ITL ms", "E2E ms", "x base")


def table(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    """Latency columns read mean/p50/p90/p99."""
    cells = [
        (
            _load(r),
            str(r["requests"]),
            str(r["completed"]),
            str(r["errors"]),
            _num(r["requests_per_min"]),
            _num(r["output_tokens_per_s"]),
            _dist(r["ttft_ms"]),
            _dist(r["itl_ms"]),
            _dist(r["e2e_ms"]),
            "-" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in [HEADERS, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("latency columns: mean/p50/p90/p99")
    lines += [
        f"errors at {_load(r)}: {r['error_kinds']} (first: {r['first_error']})" for r in rows if r["errors"]
    ]
    if baseline:
        lines.append(
            f"baseline (HF generate, 1 at a time, {baseline['dtype']} on {baseline['device']}): "
            f"{baseline['requests']} reqs, {_num(baseline['requests_per_min'])} req/min, "
            f"{_num(baseline['output_tokens_per_s'])} out tok/s; x base = server req/min / baseline req/min"
        )
    return "\n".join(lines)
