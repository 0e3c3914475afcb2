"""Percentiles and the per-run summary (stable JSON keys; latencies in milliseconds)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from serving.bench.clients import Outcome


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so p50 of [1, 2] is 1.5."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean/p50/p90/p99 of seconds, reported in ms (``scale``); all None when there is nothing to describe."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    out = {"mean": sum(values) / len(values)} | {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    return {k: round(v * scale, 3) for k, v in out.items()}


def summarize(outcomes: Sequence[Outcome], wall_s: float) -> dict[str, Any]:
    """Throughput counts only successful requests (goodput); latencies too, since a failed request's
    timings describe the failure, not the server's normal behaviour."""
    good = [o for o in outcomes if o.ok]
    kinds = Counter(o.error for o in outcomes if not o.ok)
    first_bad = next((o for o in outcomes if not o.ok), None)
    tokens = sum(o.tokens for o in good)
    per_s = 1 / wall_s if wall_s > 0 else 0.0
    return {
        "requests": len(outcomes),
        "completed": len(good),
        "errors": len(outcomes) - len(good),
        "error_kinds": dict(sorted(kinds.items())),
        "first_error": f"{first_bad.error}: {first_bad.detail}" if first_bad else None,
        "wall_s": round(wall_s, 3),
        "requests_per_min": round(len(good) * 60 * per_s, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens * per_s, 3),
        "prompt_tokens_mean": round(sum(o.prompt_tokens for o in good) / len(good), 1) if good else None,
        "ttft_ms": describe([o.ttft for o in good if o.ttft is not None]),
        "itl_ms": describe([gap for o in good for gap in o.itls]),
        "e2e_ms": describe([o.e2e for o in good]),
    }
