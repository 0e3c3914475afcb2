"""The engine contracts: plain data in, plain data out; no HTTP, no Input/Output.

Two kinds of engine exist. A task ``Engine`` serves whole dynamic batches of one task (embeddings,
classification, ...). A ``GenerationEngine`` serves text generation one step at a time: the scheduler
(``engines/scheduler.py``) admits and cancels requests between steps, and every step returns the
tokens it produced as ``TokenEvent``s (``engines/types.py``). Every generation engine (the native
Llama engine, the Hugging Face ``generate`` engine, and the GPU, tensor-parallel and quantized engines
to come) implements ``GenerationEngine``; the handler, the scheduler, the request formats and the
worker loop depend on nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engines.types import GenerationRequest, TokenEvent


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to load a model: the typed `option.*` values (declared, with their defaults
    and docs, in serving/options.py), resolved by the handler. Field names are the option names."""

    model_path: str
    """Local folder with the weights (config.json + safetensors, or a .gguf file)."""
    task: str | None = None
    """HF task; inferred from the architecture when None."""
    dtype: str = "auto"
    """fp32, fp16, bf16 or auto (engines.hf.loading.resolve_dtype says what auto picks)."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N; resolved by engines.device."""
    num_threads: int | None = None
    """Torch threads for this process; None: OMP_NUM_THREADS, else the physical cores split evenly
    between ``workers``."""
    workers: int = 1
    """Model worker processes sharing this machine (minWorkers): they must not oversubscribe it."""
    trust_remote_code: bool = False
    revision: str | None = None
    allow_unsafe_weights: bool = False
    """Permit pickle checkpoints (.bin/.pt), which can run arbitrary code when loaded."""
    gguf_file: str | None = None
    """Name of the GGUF file inside model_path, when the model is shipped as GGUF."""
    max_rolling_batch_size: int = 32
    """Sequences a generation engine runs at once (its KV cache slots)."""
    max_model_len: int | None = None
    """Prompt + generated tokens per sequence; None: min(the model's limit, 2048)."""
    kv_cache_memory_bytes: int | None = None
    """KV cache budget; fewer slots than max_rolling_batch_size when it cannot hold that many."""
    kernels: str = "auto"
    """Hot-path ops of the native engine: auto, native, triton or torch."""
    max_rolling_batch_prefill_tokens: int = 4096
    """Prompt tokens computed per step: longer prompts are split into chunks across steps."""
    block_size: int | None = None
    """Tokens per KV-cache block (a power of two); None: DEFAULT_BLOCK_SIZE for the device."""
    enable_prefix_caching: bool = True
    """Reuse the cached blocks of prompts that start like an earlier one."""
    gpu_memory_utilization: float = 0.9
    """On GPUs: the share of the device's memory the weights, activations and KV cache may use."""
    enforce_eager: bool = False
    """On GPUs: no CUDA graphs for decode steps."""
    async_scheduling: bool = True
    """On GPUs: queue step N+1 before reading step N's tokens (host work overlaps the GPU's)."""
    tensor_parallel_degree: int = 1
    """Ranks each layer is split across (engines.parallel): one process per rank, one GPU each."""
    pipeline_parallel_degree: int = 1
    """Stages the layers are split into; the group has tensor x pipeline ranks."""
    nnodes: int = 1
    """Machines the group spans; each runs world / nnodes ranks (torchrun's --nnodes)."""
    node_rank: int = 0
    """This machine's place among them; node 0 serves HTTP and runs rank 0."""
    master_addr: str | None = None
    """Where the ranks meet (torchrun's MASTER_ADDR); None: this machine, a free port."""
    master_port: int | None = None
    save_mp_checkpoint_path: str | None = None
    """Partition the model for the degrees into this folder at start-up and serve from it."""
    device_map: str | None = None
    """HF engines on GPUs: accelerate's placement (auto, balanced, sequential, a JSON map)."""
    quantize: str | None = None
    """Weight-only quantization of the native engine's projections: int8 or int4 (engines.quant)."""
    quantize_group_size: int | None = None
    """int4: input columns per scale (a smaller one that divides is used where it does not); None: 128,
    or a 4-bit GGUF source's grid of 32 (engines.quant.apply.int4_group_size)."""
    worker_index: int = 0
    """This model worker's index among minWorkers: a parallel group on GPUs takes the index-th run of
    per-node GPUs, so several groups on one machine get disjoint devices."""
    extra: dict[str, str] = field(default_factory=dict)
    """Every init property as a string (option.* without the prefix), for settings no field covers."""


@dataclass(frozen=True)
class TaskRequest:
    """One request to a task engine: one or more inputs sharing the same parameters."""

    inputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)


class EngineLoadError(RuntimeError):
    """The model cannot be loaded; the message says why and how to fix it."""


class RequestError(ValueError):
    """A request is invalid for this engine (bad parameter); maps to HTTP 400/424."""


class Engine(Protocol):
    """A loaded model that serves one task."""

    task: str

    def run(self, requests: list[TaskRequest]) -> list[list[Any]]:
        """Serve a batch of requests; returns, per request, one JSON-able result per input."""
        ...


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for logs and metrics; engines fill what they know and leave the rest at zero."""

    running: int = 0
    """Sequences holding cache room now."""
    capacity: int = 0
    """Sequences the engine can hold at once."""
    cache_tokens_used: int = 0
    cache_tokens_total: int = 0
    steps: int = 0
    """Engine steps run since start."""
    waiting: int = 0
    """Sequences admitted but not computing now (not started yet, or preempted)."""
    preemptions: int = 0
    """Sequences preempted (their cache freed, recomputed later) since start."""
    cache_blocks_total: int = 0
    cache_blocks_free: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    """Prompt tokens looked up in / found in the prefix cache since start."""


@runtime_checkable
class GenerationEngine(Protocol):
    """A loaded text-generation model served by iteration-level (or per-step lockstep) batching.

    Contract:
    * ``capacity`` sequences may be running at once; ``free_capacity()`` says how many more can join
      now. A request with ``params.n > 1`` takes ``n`` of them.
    * ``max_model_len`` bounds prompt + generated tokens of every sequence; ``check_length`` returns
      the message a client gets (HTTP 400) when a request cannot fit, or None.
    * ``tokenizer`` is a Hugging Face tokenizer (``__call__``, ``decode``, ``apply_chat_template``).
    * ``step(admit, cancel)`` adds the admitted requests, drops the cancelled request ids (each gets a
      final event with finish_reason "cancelled"), runs one step and returns the events it produced:
      one per sequence that produced a token this step for a streaming engine (a sequence whose
      prompt is still being computed in chunks, or that waits for cache room, produces none), or
      every token of the finished requests for a lockstep engine. A request's last event (per
      completion ``index``) carries its finish_reason. It never raises for one bad request: that
      request gets a finish_reason "error".
    * ``abort_all(reason)`` ends every running request with an "error" event (after a failed step).
    * ``stats()`` is cheap and may be called every step.
    """

    capacity: int
    max_model_len: int
    tokenizer: Any

    def free_capacity(self) -> int: ...

    def check_length(self, prompt_len: int, max_new_tokens: int) -> str | None: ...

    def step(self, admit: list[GenerationRequest], cancel: list[str]) -> list[TokenEvent]: ...

    def abort_all(self, reason: str) -> list[TokenEvent]: ...

    def stats(self) -> EngineStats: ...
