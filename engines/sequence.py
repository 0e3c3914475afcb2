"""One running generation: its cache room, tokens, streamed text and stop conditions."""

from __future__ import annotations

from typing import Any

import torch

from engines.detokenizer import IncrementalDetokenizer
from engines.types import GenerationRequest, TokenEvent

SEED_MODULUS = 2**64
"""torch.Generator seeds are unsigned 64-bit; seed + index wraps around."""

PENDING = -1
"""The id of a token sampled on the device but not read yet (overlapped steps): its position is taken,
so the next step can compute it from the device copy; ``Sequence.append`` fills it in."""


def eos_token_ids(tokenizer: Any, hf_config: Any, generation_config: Any | None) -> set[int]:
    """Every id that ends a generation: the generation config's, the model config's, the tokenizer's."""
    ids: set[int] = set()
    for source in (generation_config, hf_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def length_error(prompt_len: int, max_new_tokens: int, max_model_len: int) -> str | None:
    """The 400 message for a request that cannot fit ``max_model_len``, naming both numbers; else None."""
    if prompt_len + max_new_tokens <= max_model_len:
        return None
    return (
        f"Input is too long: {prompt_len} prompt tokens + max_new_tokens={max_new_tokens} = "
        f"{prompt_len + max_new_tokens} exceeds option.max_model_len={max_model_len}. "
        "Shorten the prompt or lower max_new_tokens."
    )


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still become a stop sequence."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-size:]):
                best = size
                break
    return best


class Sequence:
    """One completion (``index`` of the request's ``num_sequences``); what ``sample_next`` reads is here."""

    def __init__(
        self, request: GenerationRequest, slot: int, tokenizer: Any, eos_ids: set[int], index: int = 0
    ) -> None:
        """slot: the engine's row for it (the lockstep engine's batch row; -1 in the paged engine,
        whose room is ``blocks``)."""
        self.request = request
        self.params = request.params
        self.slot = slot
        self.token_ids: list[int] = list(request.prompt_ids)
        """Prompt then generated ids: what the cache must hold (recomputed after a preemption)."""
        self.blocks: list[int] = []
        """Paged engine: the cache blocks holding token_ids[:num_cached], in order."""
        self.block_keys: list[bytes] = []
        """Paged engine: prefix-cache keys of the leading full blocks already sealed."""
        self.preemptions = 0
        self.cached_prompt_tokens = 0
        """Prompt tokens found in the prefix cache when it started (not counting recomputes)."""
        self.index = index
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.output_ids: list[int] = []
        self.reserved = 0
        """Trailing PENDING entries of token_ids: tokens sampled in steps whose results are not read yet."""
        self.output_counts: dict[int, int] = {}
        """Generated token id -> occurrences, kept up to date by ``append`` (presence/frequency penalty)."""
        self._prompt_ids: set[int] | None = None
        self.num_cached = 0
        """Tokens whose K/V are in the cache; the engine advances it after each forward."""
        self.text = ""
        self.emitted = 0
        self.scanned = 0  # text before this offset holds no stop sequence
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.generator: torch.Generator | None = None
        if self.params.do_sample and self.params.seed is not None:
            # Completion i draws with seed + i (as vLLM): each is reproducible, index 0 matches n=1.
            self.generator = torch.Generator().manual_seed((self.params.seed + index) % SEED_MODULUS)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def next_input(self, limit: int | None = None) -> tuple[list[int], int]:
        """Tokens to feed this step (at most ``limit``) and the position of the first: every token not
        yet cached, so the prompt (in chunks), then each new token, and everything after a preemption."""
        end = len(self.token_ids) if limit is None else min(len(self.token_ids), self.num_cached + limit)
        return self.token_ids[self.num_cached : end], self.num_cached

    def reserve(self) -> None:
        """Take the position of a token sampled on the device and not read yet (see PENDING)."""
        self.token_ids.append(PENDING)
        self.reserved += 1

    @property
    def generated(self) -> int:
        """Tokens generated so far, those not read yet included."""
        return len(self.output_ids) + self.reserved

    def exhausted(self) -> bool:
        """True when max_new_tokens are generated or reserved: it must not compute another."""
        return self.generated >= self.params.max_new_tokens

    def known_ids(self) -> list[int]:
        """token_ids without the trailing PENDING ones."""
        return self.token_ids[: len(self.token_ids) - self.reserved]

    def uncomputed(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.token_ids) - self.num_cached

    def penalized_ids(self) -> list[int]:
        """Distinct ids of the prompt and the generated tokens (repetition penalty)."""
        if self._prompt_ids is None:
            self._prompt_ids = set(self.request.prompt_ids)
        return list(self._prompt_ids.union(self.output_counts))

    def blocks_eos(self) -> bool:
        """True while min_new_tokens holds back EOS and the stop_token_ids."""
        return self.generated < self.params.min_new_tokens

    def append(
        self, token_id: int, logprob: float, top_logprobs: tuple[tuple[int, float], ...] = ()
    ) -> TokenEvent:
        """Record the sampled token (in the oldest reserved position, if any); returns its event, final
        when a stop condition is met. The engine has already counted the fed tokens into ``num_cached``."""
        self.output_ids.append(token_id)
        if self.reserved:
            self.token_ids[len(self.token_ids) - self.reserved] = token_id
            self.reserved -= 1
        else:
            self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        is_eos = token_id in self.eos_ids and not self.params.ignore_eos
        is_stop = token_id in self.stop_ids
        if not (is_eos or is_stop):
            self.text += self.detokenizer.add(token_id)
        reason = self._finish_reason(is_eos, is_stop)
        return TokenEvent(
            self.request_id,
            token_id,
            self._take_text(reason is not None),
            logprob,
            reason,
            index=self.index,
            top_logprobs=top_logprobs,
            top_texts=tuple(self.tokenizer.decode([t]) for t, _ in top_logprobs),
        )

    def _finish_reason(self, is_eos: bool, is_stop: bool) -> str | None:
        for stop in self.params.stop_sequences:  # only new text can complete one: no rescans
            index = self.text.find(stop, max(0, self.scanned - len(stop) + 1))
            if index >= 0:
                self.text = self.text[:index]
                return "stop_sequence"
        self.scanned = len(self.text)
        if is_eos:
            return "eos_token"
        if is_stop:
            return "stop_sequence"
        if len(self.output_ids) >= self.params.max_new_tokens:
            return "length"
        return None

    def _take_text(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - held_back(self.text, self.params.stop_sequences)
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
