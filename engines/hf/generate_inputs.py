"""Model inputs of a lockstep batch for the HF generate engine: how a causal and an encoder-decoder
model are fed their prompts once and then one token per row per step."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from engines.base import EngineLoadError


class CausalInputs:
    """Model inputs of a decoder-only batch: left-padded prompts, then one token per row per step."""

    def __init__(self, model: Any, pad_id: int) -> None:
        accepted = inspect.signature(model.forward).parameters
        self.pad_id = pad_id
        self.takes_positions = "position_ids" in accepted
        self.keep_last = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in accepted), None)
        self.mask = self.positions = torch.empty(0)

    def prefill(
        self, prompts: list[list[int]], device: torch.device, every_position: bool = False
    ) -> dict[str, Any]:
        """``every_position``: logits for the whole prompt (prompt log-probabilities), not the last."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            self.mask[row, width - len(prompt) :] = 1
        self.mask = self.mask.to(device)
        # Left padding must not shift positions: each row counts from its first real token.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": ids.to(device), "attention_mask": self.mask}
        if self.keep_last and not every_position:  # the last position's logits only: [rows, 1, vocab]
            inputs[self.keep_last] = 1
        return self._with_positions(inputs)

    def decode(self, tokens: torch.Tensor) -> dict[str, Any]:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        self.positions = self.positions[:, -1:] + 1
        inputs = {"input_ids": tokens[:, None], "attention_mask": self.mask}
        return self._with_positions(inputs)

    def _with_positions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.takes_positions:
            inputs["position_ids"] = self.positions
        return inputs

    def expand(self, rows: torch.Tensor) -> None:
        """After a prefill of distinct prompts: one mask/position row per completion."""
        self.mask, self.positions = self.mask[rows], self.positions[rows]


class Seq2SeqInputs:
    """Model inputs of an encoder-decoder batch: the encoder runs once, the decoder once per step."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        self.start_id = start if start is not None else model.config.decoder_start_token_id
        if self.start_id is None:
            raise EngineLoadError(f"{type(model).__name__} has no decoder_start_token_id in its config.")
        self.encoded: dict[str, Any] = {}

    def prefill(
        self, prompts: list[list[int]], device: torch.device, every_position: bool = False
    ) -> dict[str, Any]:
        """``every_position`` is ignored: an encoder-decoder scores no prompt tokens."""
        width = max(len(p) for p in prompts)
        # Right padding, as HF tokenizers pad encoder inputs (BART's learned positions start at 0).
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
        ids, mask = ids.to(device), mask.to(device)
        encoder_outputs = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)
        self.encoded = {"encoder_outputs": encoder_outputs, "attention_mask": mask}
        starts = torch.full((len(prompts), 1), self.start_id, dtype=torch.long, device=device)
        return {**self.encoded, "decoder_input_ids": starts}

    def decode(self, tokens: torch.Tensor) -> dict[str, Any]:
        return {**self.encoded, "decoder_input_ids": tokens[:, None]}

    def expand(self, rows: torch.Tensor) -> None:
        """After encoding distinct prompts: one encoder output and mask row per completion."""
        outputs = self.encoded["encoder_outputs"]
        outputs.last_hidden_state = outputs.last_hidden_state[rows]
        self.encoded["attention_mask"] = self.encoded["attention_mask"][rows]
