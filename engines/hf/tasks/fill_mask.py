"""fill-mask: the `top_k` (default 5) most likely tokens for the mask, as in the HF pipeline.

Per input a list of `{"score", "token", "token_str", "sequence"}`; an input with several masks gets
one such list per mask.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.base import EngineLoadError, RequestError, TaskRequest
from engines.hf.loading import LoadedModel
from engines.hf.tasks.packing import all_inputs, split_per_request
from engines.hf.tasks.params import as_int, reject_unknown

DEFAULT_TOP_K = 5


class FillMaskRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if self.tokenizer.mask_token_id is None:
            raise EngineLoadError(f"The tokenizer of {loaded.checkpoint.describe()} has no mask token.")
        self.tokenizer.padding_side = "right"

    def run(self, requests: list[TaskRequest]) -> list[list[Any]]:
        top_ks = [self._top_k(request.parameters) for request in requests]
        texts = all_inputs(requests)
        per_text_k = [k for request, k in zip(requests, top_ks, strict=True) for _ in request.inputs]
        predictions = self.predict(texts, per_text_k) if texts else []
        return [list(rows) for rows in split_per_request(requests, predictions)]

    def _top_k(self, parameters: dict[str, Any]) -> int:
        reject_unknown(parameters, ("top_k",), "fill-mask")
        value = parameters.get("top_k")
        return DEFAULT_TOP_K if value is None else as_int("top_k", value, 1)

    def predict(self, texts: list[str], top_ks: list[int]) -> list[Any]:
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        masks = encoded["input_ids"] == self.tokenizer.mask_token_id
        for text, has_mask in zip(texts, masks.any(dim=1).tolist(), strict=True):
            if not has_mask:
                raise RequestError(
                    f"Invalid input {text!r}: it contains no {self.tokenizer.mask_token} token."
                )
        with torch.inference_mode():
            logits = self.model(**encoded.to(self.model.device)).logits.float().cpu()
        outputs = []
        for row, top_k in enumerate(top_ks):
            ids = encoded["input_ids"][row][encoded["attention_mask"][row].bool()]
            positions = masks[row].nonzero().flatten().tolist()
            per_mask = [
                self._candidates(ids, position, logits[row, position], top_k) for position in positions
            ]
            outputs.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return outputs

    def _candidates(self, ids: torch.Tensor, position: int, logits: torch.Tensor, top_k: int) -> list[dict]:
        scores, tokens = logits.softmax(dim=-1).topk(min(top_k, logits.shape[-1]))
        candidates = []
        for score, token in zip(scores.tolist(), tokens.tolist(), strict=True):
            filled = ids.clone()
            filled[position] = token
            candidates.append(
                {
                    "score": score,
                    "token": token,
                    "token_str": self.tokenizer.decode([token]),
                    "sequence": self.tokenizer.decode(filled, skip_special_tokens=True),
                }
            )
        return candidates


def create_runner(loaded: LoadedModel) -> FillMaskRunner:
    return FillMaskRunner(loaded)
