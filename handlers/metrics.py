"""A generation worker's metrics: per finished request, per engine step, and sampled engine state.

Per token nothing happens here: a request's latencies and token counts are recorded once, when its
last reply leaves (``Usage``), and engine gauges are read from ``EngineStats`` at most every
``SAMPLE_INTERVAL_S``, so the hot loop pays a histogram update per step and a time check.
"""

from __future__ import annotations

import copy

from engines.base import EngineStats
from handlers.replies import Usage
from serving.metrics import WorkerMetrics


class GenerationMetrics:
    """WorkerMetrics bound to one model's label, fed by the GenerationWorker loop."""

    SAMPLE_INTERVAL_S = 0.5

    def __init__(self, model: str, metrics: WorkerMetrics | None = None) -> None:
        m = metrics or WorkerMetrics()
        self._ttft, self._itl = m.ttft.labels(model), m.itl.labels(model)
        self._prompt, self._generated = m.prompt_tokens.labels(model), m.generation_tokens.labels(model)
        self._batch = m.batch_size.labels(model)
        self._running, self._waiting = m.running.labels(model), m.waiting.labels(model)
        self._kv_used, self._kv_free = m.kv_used.labels(model), m.kv_free.labels(model)
        self._queried, self._hits = m.prefix_queried.labels(model), m.prefix_hits.labels(model)
        self._preemptions = m.preemptions.labels(model)
        self._last = EngineStats()
        self._sampled_at = float("-inf")

    def on_step(self, sequences: int) -> None:
        if sequences:
            self._batch.observe(sequences)

    def on_finished(self, usage: Usage, now: float) -> None:
        """One request's token counts and latencies, when its last reply is sent."""
        self._prompt.inc(usage.prompt_tokens)
        self._generated.inc(usage.generated_tokens)
        if usage.first_token_at:
            self._ttft.observe(max(usage.first_token_at - usage.arrived, 0.0))
            if usage.generated_tokens > 1:
                self._itl.observe((now - usage.first_token_at) / (usage.generated_tokens - 1))

    def due(self, now: float) -> bool:
        return now - self._sampled_at >= self.SAMPLE_INTERVAL_S

    def sample(self, stats: EngineStats, queued: int, now: float) -> None:
        """Gauges from a stats snapshot; counters move by what the engine's totals grew since the last
        one. ``queued``: requests the worker holds that the engine has not admitted yet."""
        self._sampled_at = now
        self._running.set(stats.running)
        self._waiting.set(stats.waiting + queued)
        self._kv_used.set(stats.cache_blocks_total - stats.cache_blocks_free)
        self._kv_free.set(stats.cache_blocks_free)
        last = self._last
        for counter, new, old in (
            (self._queried, stats.prefix_queried_tokens, last.prefix_queried_tokens),
            (self._hits, stats.prefix_hit_tokens, last.prefix_hit_tokens),
            (self._preemptions, stats.preemptions, last.preemptions),
        ):
            if new > old:
                counter.inc(new - old)
        self._last = copy.copy(stats)  # an engine may update one object in place
