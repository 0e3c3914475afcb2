"""What a benchmark run does (target, load rows, request shape); plain data, cheap to import."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8080"
    api: str = "lmi"
    model: str | None = None
    concurrency: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    max_concurrency: int = 256
    num_requests: int | None = None
    duration_s: float | None = None
    max_new_tokens: int = 128
    timeout_s: float = 120.0
    warmup: int = 1
    tgi_ignore_eos: str | None = "auto"
    """auto/on/off as asked; after resolve_api: on/off for TGI, None for the other APIs."""
    seed: int = 0

    def loads(self) -> list[tuple[str, float]]:
        """("closed", C) then ("open", R) rows; a plain run is one closed-loop client."""
        if not self.concurrency and not self.rates:
            return [("closed", 1)]
        return [("closed", c) for c in self.concurrency] + [("open", r) for r in self.rates]

    def row_requests(self, mode: str, level: float) -> int | None:
        """--num-requests, else (without --duration) enough for a steady state: 4 per client, >= 32."""
        if self.num_requests is not None or self.duration_s is not None:
            return self.num_requests
        return max(32, 4 * int(level) if mode == "closed" else math.ceil(10 * level))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
