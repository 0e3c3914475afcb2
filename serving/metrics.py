"""Prometheus metrics, written by every process of the server and read by ``GET /metrics``.

prometheus_client's multiprocess mode: each process (HTTP front workers, the broker in the main
process, each model worker) writes its values to memory-mapped files in one folder of the server's
runtime dir, and the front sums them when scraped. ``enable_multiprocess`` names that folder in the
environment before any process imports prometheus_client (its value class is chosen at import), so
this module imports it only inside functions. Metric definitions live here, in one table, by the
process that writes them; see the README's "Metrics and logs" for what each one means.
"""

from __future__ import annotations

import os
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                         0.75, 1, 2.5, 5, 10, 20, 40, 80)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODEL = ("model",)


def metrics_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "metrics")


def enable_multiprocess(runtime_dir: str) -> str:
    """Create the metrics folder and name it in this process's environment, which every process the
    server starts inherits; call before anything imports prometheus_client."""
    path = metrics_dir(runtime_dir)
    os.makedirs(path, exist_ok=True)
    os.environ[MULTIPROC_ENV] = path
    return path


def exposition(path: str) -> tuple[bytes, str]:
    """The text exposition of every process's values (the body and content type of /metrics)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int | None) -> None:
    """Drop a dead process's live gauges (its counters and histograms still count in the totals)."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _counter(name: str, doc: str, labels: tuple[str, ...] = MODEL) -> Any:
    from prometheus_client import Counter

    return Counter(name, doc, labels, registry=None)  # multiprocess: values go to files, not a registry


def _gauge(name: str, doc: str, mode: str, labels: tuple[str, ...] = MODEL) -> Any:
    from prometheus_client import Gauge

    return Gauge(name, doc, labels, registry=None, multiprocess_mode=mode)


def _histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = MODEL) -> Any:
    from prometheus_client import Histogram

    return Histogram(name, doc, labels, registry=None, buckets=buckets)


class FrontMetrics:
    """Written by the HTTP front processes, once per request when its response is closed."""

    def __init__(self) -> None:
        self.requests = _counter(
            "lmi_requests", "Requests answered, by route, dialect and HTTP status.",
            ("model", "route", "dialect", "status"),
        )  # fmt: skip
        self.e2e = _histogram(
            "lmi_e2e_request_latency_seconds",
            "Arrival to last byte sent, per inference request.",
            LATENCY_BUCKETS,
            ("model", "dialect"),
        )

    def on_request(self, model: str, route: str, dialect: str, status: int, seconds: float) -> None:
        self.requests.labels(model, route, dialect, str(status)).inc()
        if dialect:  # an inference route (the others have no dialect)
            self.e2e.labels(model, dialect).observe(seconds)


class BrokerMetrics:
    """Written by the broker thread of the main process."""

    def __init__(self) -> None:
        self.queue_depth = _gauge("lmi_queue_depth", "Requests waiting for a model worker.", "mostrecent")
        self.queue_wait = _histogram(
            "lmi_queue_wait_seconds", "Time from arrival at the broker to dispatch to a worker.",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.restarts = _counter("lmi_worker_restarts", "Model workers restarted after a crash or hang.")
        self.load_time = _gauge(
            "lmi_model_load_seconds", "Start to ready of the latest model worker (load time).", "mostrecent"
        )


class WorkerMetrics:
    """Written by the model workers: per finished request, per step, and sampled engine state."""

    def __init__(self) -> None:
        self.ttft = _histogram(
            "lmi_time_to_first_token_seconds",
            "Arrival at the broker to the first generated token.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.itl = _histogram(
            "lmi_inter_token_latency_seconds",
            "Mean time between generated tokens, per request.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.prompt_tokens = _counter("lmi_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = _counter("lmi_generation_tokens", "Tokens generated for finished requests.")
        self.batch_size = _histogram(
            "lmi_batch_size", "Sequences that produced a token, per engine step.", BATCH_BUCKETS
        )
        self.running = _gauge("lmi_num_requests_running", "Sequences the engine is computing.", "livesum")
        self.waiting = _gauge(
            "lmi_num_requests_waiting", "Sequences in a worker waiting for room or preempted.", "livesum"
        )
        self.kv_used = _gauge("lmi_kv_cache_blocks_used", "KV-cache blocks holding sequences.", "livesum")
        self.kv_free = _gauge("lmi_kv_cache_blocks_free", "KV-cache blocks free.", "livesum")
        self.prefix_queried = _counter(
            "lmi_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = _counter("lmi_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.")
        self.preemptions = _counter("lmi_preemptions", "Sequences preempted (cache freed, recomputed later).")
