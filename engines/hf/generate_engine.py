"""HfGenerateEngine: streaming, lockstep-batched generation for any Hugging Face causal or seq2seq LM.

It serves the ``GenerationEngine`` contract (engines/base.py) for the models the native Llama engine
cannot run (GPT-2, T5, BART, ...) and for ``option.rolling_batch=disable``.

Batching policy (lockstep): the requests admitted while no batch runs become one batch (a request with
``params.n > 1`` gives ``n`` rows). The first step prefills each distinct prompt once, copies its
cache row to its other completions and samples one token per row; every later step runs one cached
decode step for the whole batch. Nobody joins a running batch:
``free_capacity()`` is 0 until every row has finished or been cancelled, so the scheduler keeps new
requests waiting. Finished rows are not compacted away; they keep being computed (like
``model.generate`` does) until the batch ends, but never emit again.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from engines.base import EngineConfig, EngineLoadError, EngineStats
from engines.hf.generate_inputs import CausalInputs, Seq2SeqInputs
from engines.sampling import prompt_token_logprobs, sample_next
from engines.sequence import Sequence, eos_token_ids, length_error
from engines.types import GenerationRequest, TokenEvent

log = logging.getLogger("engines.hf")

GENERATION_TASKS = ("text-generation", "text2text-generation")
DEFAULT_MAX_MODEL_LEN = 2048
"""For models whose config names no position limit. T5-style models use relative position buckets, so
nothing in the model caps the length; this bound keeps the decoder's KV cache (and the encoder input)
to a size a CPU or a single GPU can hold, and option.max_model_len raises it."""
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def position_limit(hf_config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says."""
    for key in POSITION_LIMIT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def create_hf_generate_engine(config: EngineConfig) -> HfGenerateEngine:
    """Load a text-generation or text2text-generation model from `config` and wrap it in the engine."""
    from engines.hf.loading import load

    loaded = load(config)
    if loaded.task not in GENERATION_TASKS:
        raise EngineLoadError(
            f"{loaded.checkpoint.describe()} is a {loaded.task!r} model; the generate engine serves "
            f"{' or '.join(GENERATION_TASKS)} only. Set option.task to one of those, or serve the model "
            "without option.rolling_batch."
        )
    limit = position_limit(loaded.model.config)
    max_model_len = config.max_model_len or limit or DEFAULT_MAX_MODEL_LEN
    if limit is not None and max_model_len > limit:
        raise EngineLoadError(
            f"option.max_model_len={max_model_len} exceeds the model's {limit} positions; lower it."
        )
    capacity = config.max_rolling_batch_size
    log.info(
        "HF generate engine: %s (%s), %d rows per batch, max_model_len %d",
        type(loaded.model).__name__,
        loaded.dtype,
        capacity,
        max_model_len,
    )
    return HfGenerateEngine(loaded.model, loaded.tokenizer, capacity, max_model_len)


@dataclass
class Row:
    """One completion in the batch: its sequence state and which of its request's `n` it is."""

    seq: Sequence
    index: int
    done: bool = False
    last_token: int = 0


@dataclass
class Batch:
    rows: list[Row]
    inputs: CausalInputs | Seq2SeqInputs
    past: Any = None
    length: int = 0
    """Positions held in the KV cache per row (padded prompt + decoded tokens)."""

    def live(self) -> list[Row]:
        return [row for row in self.rows if not row.done]


def final_events(request: GenerationRequest, reason: str, error: str | None = None) -> list[TokenEvent]:
    """One closing event per completion index of a request that never got (or lost) its rows."""
    return [
        TokenEvent(request.request_id, -1, "", 0.0, reason, error, index=index)
        for index in range(max(request.params.num_sequences, 1))
    ]


class HfGenerateEngine:
    """A ``GenerationEngine`` over a transformers model's forward with ``past_key_values``."""

    def __init__(self, model: Any, tokenizer: Any, capacity: int, max_model_len: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.capacity, self.max_model_len = capacity, max_model_len
        self.device = model.get_input_embeddings().weight.device  # the first GPU of a device_map
        self.eos_ids = eos_token_ids(tokenizer, model.config, getattr(model, "generation_config", None))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.pad_id = next(
            (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None and t >= 0), 0
        )
        self.is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        # transformers 5.x renamed the forward argument and output field `past_key_values` to `cache`.
        accepted = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in accepted else "past_key_values"
        self.batch: Batch | None = None
        self.pending: list[GenerationRequest] = []
        """Admitted requests waiting for the running batch to end (only if admitted past capacity)."""
        self.steps = 0

    def free_capacity(self) -> int:
        return 0 if self.batch is not None or self.pending else self.capacity

    def check_length(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """A message when prompt + max_new_tokens exceeds max_model_len, else None."""
        return length_error(prompt_len, max_new_tokens, self.max_model_len)

    def step(self, admit: list[GenerationRequest], cancel: list[str]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for request in admit:
            error = self._invalid(request)
            if error:
                events.extend(final_events(request, "error", error))
            else:
                self.pending.append(request)
        events.extend(self._cancel(set(cancel)))
        self._retire()
        if self.batch is not None:
            events.extend(self._decode())
        elif self.pending:
            events.extend(self._prefill())
        self._retire()
        return events

    def abort_all(self, reason: str) -> list[TokenEvent]:
        """After a failed step: end every running and pending request with an error."""
        rows = self.batch.live() if self.batch else []
        events = [TokenEvent(r.seq.request_id, -1, "", 0.0, "error", reason, index=r.index) for r in rows]
        for request in self.pending:
            events.extend(final_events(request, "error", reason))
        self.batch, self.pending = None, []
        return events

    def stats(self) -> EngineStats:
        rows = len(self.batch.rows) if self.batch else 0
        length = self.batch.length if self.batch else 0
        total = self.capacity * self.max_model_len  # the most a batch's cache can hold
        return EngineStats(rows, self.capacity, rows * length, total, self.steps)

    def _invalid(self, request: GenerationRequest) -> str | None:
        """Why this request cannot run here, or None; checked before it can disturb a batch."""
        ids, n = request.prompt_ids, request.params.num_sequences
        if not ids:
            return "The prompt is empty: it encodes to no tokens."
        if not 1 <= n <= self.capacity:
            return f"n={n} must be between 1 and option.max_rolling_batch_size={self.capacity}."
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            return f"Prompt token ids must lie in [0, {self.vocab_size}); got {min(ids)}..{max(ids)}."
        return self.check_length(len(ids), request.params.max_new_tokens)

    def _cancel(self, request_ids: set[str]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for request in [r for r in self.pending if r.request_id in request_ids]:
            self.pending.remove(request)
            events.extend(final_events(request, "cancelled"))
        for row in self.batch.live() if self.batch else []:
            if row.seq.request_id in request_ids:
                row.done = True
                events.append(TokenEvent(row.seq.request_id, -1, "", 0.0, "cancelled", index=row.index))
        return events

    def _retire(self) -> None:
        if self.batch is not None and not self.batch.live():
            self.batch = None  # frees the KV cache

    def _take_pending(self) -> list[Row]:
        """Rows for the pending requests that fit `capacity` (the first one always fits: n <= capacity)."""
        rows: list[Row] = []
        while self.pending and len(rows) + self.pending[0].params.num_sequences <= self.capacity:
            request = self.pending.pop(0)
            for index in range(request.params.num_sequences):
                rows.append(Row(self._fork(request, index, slot=len(rows)), index))
        return rows

    def _fork(self, request: GenerationRequest, index: int, slot: int) -> Sequence:
        return Sequence(request, slot, self.tokenizer, self.eos_ids, index)  # seeded: seed + index

    @torch.inference_mode()
    def _prefill(self) -> list[TokenEvent]:
        """Prefill each distinct request once; its ``n`` completions then share that cache row."""
        rows = self._take_pending()
        inputs = (Seq2SeqInputs if self.is_seq2seq else CausalInputs)(self.model, self.pad_id)
        first = {row.seq.request_id: i for i, row in enumerate(r for r in rows if r.index == 0)}
        prompts = [row.seq.request.prompt_ids for row in rows if row.index == 0]
        self.batch = Batch(rows, inputs)
        shared = [first[row.seq.request_id] for row in rows]
        # On the CPU: an index there reads tensors on any GPU of a device_map (encoder output, logits).
        expand = None if len(prompts) == len(rows) else torch.tensor(shared)
        scored = {} if self.is_seq2seq else {first[r.seq.request_id]: r.seq for r in rows if r.index == 0}
        scored = {u: seq for u, seq in scored.items() if seq.params.prompt_logprobs}
        return self._forward(inputs.prefill(prompts, self.device, bool(scored)), expand, scored)

    def _prompt_tokens(self, logits: torch.Tensor, seq: Sequence) -> tuple:
        """Prompt log-probabilities from one left-padded row of logits [width, vocab]."""
        ids = seq.request.prompt_ids
        return prompt_token_logprobs(logits[logits.shape[0] - len(ids) : -1], ids, self.tokenizer)

    @torch.inference_mode()
    def _decode(self) -> list[TokenEvent]:
        batch = self.batch
        tokens = torch.tensor([row.last_token for row in batch.rows], dtype=torch.long, device=self.device)
        return self._forward({**batch.inputs.decode(tokens), self.cache_key: batch.past})

    def _forward(
        self, inputs: dict[str, Any], expand: torch.Tensor | None = None, scored: dict | None = None
    ) -> list[TokenEvent]:
        """Run the model on `inputs`, then sample and emit one token for every live row. ``expand``
        maps each batch row to its row of `inputs` (a prefill of distinct prompts for n completions)."""
        batch = self.batch
        output = self.model(**inputs, use_cache=True, return_dict=True)
        fed = inputs["decoder_input_ids" if self.is_seq2seq else "input_ids"]
        batch.past, batch.length = output[self.cache_key], batch.length + fed.shape[1]
        all_logits = output.logits
        prompts = {
            seq.request_id: self._prompt_tokens(all_logits[u], seq) for u, seq in (scored or {}).items()
        }
        if expand is not None:
            batch.past.reorder_cache(expand)  # every completion gets its own copy of the prompt's cache
            batch.inputs.expand(expand)
            all_logits = all_logits[expand]
        self.steps += 1
        live = batch.live()
        picked = torch.tensor([row.seq.slot for row in live], device=all_logits.device)
        logits = all_logits[picked, -1, :].float().cpu()  # [live rows, vocab]
        events = []
        picks = sample_next(logits, [row.seq for row in live], self.eos_ids)
        for row, choice in zip(live, picks, strict=True):
            event = row.seq.append(*choice)
            event.index, row.last_token = row.index, choice.token_id
            if row.index == 0:
                event.prompt_tokens = prompts.get(row.seq.request_id, ())
            row.done = event.finish_reason is not None
            events.append(event)
        return events
