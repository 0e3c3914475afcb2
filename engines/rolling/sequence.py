"""One running generation: its cache slot, tokens, streamed text and stop conditions."""

from __future__ import annotations

from typing import Any

import torch

from engines.rolling.detokenizer import IncrementalDetokenizer
from engines.types import GenerationRequest, TokenEvent


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
    def __init__(self, request: GenerationRequest, slot: int, tokenizer: Any, eos_ids: set[int]) -> None:
        self.request = request
        self.params = request.params
        self.slot = slot
        self.eos_ids = eos_ids
        self.output_ids: list[int] = []
        self.num_cached = 0
        self.text = ""
        self.emitted = 0
        self.scanned = 0  # text before this offset holds no stop sequence
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.generator: torch.Generator | None = None
        if self.params.do_sample and self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def next_input(self) -> tuple[list[int], int]:
        """Tokens to feed this step and the position of the first: the prompt once, then the last token."""
        if self.num_cached == 0:
            return self.request.prompt_ids, 0
        return self.output_ids[-1:], self.num_cached

    def history(self) -> torch.Tensor:
        return torch.tensor(self.request.prompt_ids + self.output_ids, dtype=torch.long)

    def blocks_eos(self) -> bool:
        return len(self.output_ids) < self.params.min_new_tokens

    def append(self, token_id: int, logprob: float) -> TokenEvent:
        """Record the sampled token; returns its event, final when a stop condition is met."""
        fed, _ = self.next_input()
        self.num_cached += len(fed)
        self.output_ids.append(token_id)
        is_eos = token_id in self.eos_ids and not self.params.ignore_eos
        if not is_eos:
            self.text += self.detokenizer.add(token_id)
        reason = self._finish_reason(is_eos)
        return TokenEvent(self.request_id, token_id, self._take_text(reason is not None), logprob, reason)

    def _finish_reason(self, is_eos: bool) -> str | None:
        for stop in self.params.stop_sequences:  # only new text can complete one: no rescans
            index = self.text.find(stop, max(0, self.scanned - len(stop) + 1))
            if index >= 0:
                self.text = self.text[:index]
                return "stop_sequence"
        self.scanned = len(self.text)
        if is_eos:
            return "eos_token"
        if len(self.output_ids) >= self.params.max_new_tokens:
            return "length"
        return None

    def _take_text(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - held_back(self.text, self.params.stop_sequences)
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
