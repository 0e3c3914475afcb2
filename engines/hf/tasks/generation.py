"""Generation shared by causal and seq2seq models: batching, seeds, stop sequences and details.

Inputs of requests with identical parameters and no seed share one padded `generate` call. Inputs of
seeded requests run one at a time with the global RNG re-seeded inside `fork_rng`, so the same seed and
prompt give the same text whatever else is in the batch, and the caller's RNG state is untouched.
Stop sequences are excluded from the output: the text ends right before the first one found.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from engines.base import EngineLoadError, RequestError, TaskRequest
from engines.hf.loading import LoadedModel
from engines.hf.tasks.generation_params import GenerationParams, parse_generation_params


@dataclass
class Job:
    """Prompts generated together, and where each result goes: (request index, input index)."""

    params: GenerationParams
    slots: list[tuple[int, int]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


def plan_jobs(requests: Sequence[TaskRequest], params: Sequence[GenerationParams]) -> list[Job]:
    """Group unseeded inputs by parameters, in first-seen order; every seeded input is its own job."""
    jobs: list[Job] = []
    shared: dict[GenerationParams, Job] = {}
    for request_index, (request, request_params) in enumerate(zip(requests, params, strict=True)):
        for input_index, prompt in enumerate(request.inputs):
            if request_params.seed is None and request_params in shared:
                job = shared[request_params]
            else:
                job = Job(request_params)
                jobs.append(job)
                if request_params.seed is None:
                    shared[request_params] = job
            job.slots.append((request_index, input_index))
            job.prompts.append(prompt)
    return jobs


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed the RNGs for the block only, restoring the previous state afterwards."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop sequence in it."""
    positions = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return text[: min(positions)] if positions else text


class StopOnSequences(StoppingCriteria):
    """Finishes each row once its generated text contains a stop sequence; remembers when."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], start: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, stops, start
        self.stopped_at: dict[int, int] = {}
        """Row → number of generated tokens when its stop sequence appeared."""

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, ids in enumerate(input_ids):
            if row not in self.stopped_at:
                text = self.tokenizer.decode(ids[self.start :], skip_special_tokens=True)
                if any(stop in text for stop in self.stops):
                    self.stopped_at[row] = len(ids) - self.start
        done = [row in self.stopped_at for row in range(len(input_ids))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Generator:
    """Serves text-generation (causal) or text2text-generation (seq2seq) requests."""

    def __init__(self, loaded: LoadedModel, *, causal: bool) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.task, self.causal = loaded.task, causal
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise EngineLoadError(
                    f"{loaded.checkpoint.describe()}: the tokenizer has no pad or eos token."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if causal:
            self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {token for token in [*eos, self.tokenizer.eos_token_id] if token is not None}
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def run(self, requests: list[TaskRequest]) -> list[list[dict[str, Any]]]:
        params = [parse_generation_params(r.parameters, self.task, causal=self.causal) for r in requests]
        results: list[list[Any]] = [[None] * len(request.inputs) for request in requests]
        for job in plan_jobs(requests, params):
            outputs = self._generate(job.params, job.prompts)
            for (request_index, input_index), output in zip(job.slots, outputs, strict=True):
                results[request_index][input_index] = output
        return results

    def _encode(self, prompts: list[str], params: GenerationParams) -> Any:
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        if min(lengths) == 0:
            raise RequestError("Invalid input: a prompt is empty (it encodes to no tokens).")
        if self.causal and self.max_positions and max(lengths) + params.max_new_tokens > self.max_positions:
            raise RequestError(
                f"Invalid input: {max(lengths)} prompt tokens + max_new_tokens={params.max_new_tokens} "
                f"exceed the model's context of {self.max_positions} tokens."
            )
        return encoded.to(self.model.device)

    def _generate(self, params: GenerationParams, prompts: list[str]) -> list[dict[str, Any]]:
        encoded = self._encode(prompts, params)
        start = encoded["input_ids"].shape[1] if self.causal else 1  # seq2seq output starts with BOS
        stops = params.stop_sequences
        stopper = StopOnSequences(self.tokenizer, stops, start) if stops else None
        with torch.inference_mode(), seeded(params.seed):
            output = self.model.generate(
                **encoded,
                **params.generate_kwargs(),
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
            )
        stopped_at = stopper.stopped_at if stopper else {}
        return [
            self._result(prompt, output[row, start:].tolist(), params, stopped_at.get(row))
            for row, prompt in enumerate(prompts)
        ]

    def _result(
        self, prompt: str, ids: list[int], params: GenerationParams, stopped_at: int | None
    ) -> dict[str, Any]:
        kept, generated, reason = self._finish(ids, stopped_at)
        text = cut_at_stop(self.tokenizer.decode(ids[:kept], skip_special_tokens=True), params.stop_sequences)
        result: dict[str, Any] = {"generated_text": prompt + text if params.return_full_text else text}
        if params.details:
            result["details"] = {"finish_reason": reason, "generated_tokens": generated, "inputs": prompt}
        return result

    def _finish(self, ids: list[int], stopped_at: int | None) -> tuple[int, int, str]:
        """(tokens to decode, tokens generated, finish reason), whichever of stop/eos/length came first."""
        eos_at = next((index for index, token in enumerate(ids) if token in self.eos_ids), None)
        if stopped_at is not None and (eos_at is None or stopped_at <= eos_at):
            return stopped_at, stopped_at, "stop_sequence"
        if eos_at is not None:
            return eos_at, eos_at + 1, "eos_token"
        return len(ids), len(ids), "length"
