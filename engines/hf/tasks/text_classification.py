"""text-classification: per input the best `{"label", "score"}`, or with `top_k` a list sorted by score.

Scores are softmax probabilities, or sigmoids for multi-label / single-output models (as in the HF
pipeline); labels come from the model's id2label.
"""

from __future__ import annotations

from typing import Any

import torch

from engines.base import TaskRequest
from engines.hf.loading import LoadedModel
from engines.hf.tasks.packing import all_inputs, split_per_request
from engines.hf.tasks.params import as_int, reject_unknown


class ClassificationRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        config = self.model.config
        self.labels = [config.id2label.get(index, f"LABEL_{index}") for index in range(config.num_labels)]
        self.sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1

    def run(self, requests: list[TaskRequest]) -> list[list[Any]]:
        top_ks = [self._top_k(request.parameters) for request in requests]
        texts = all_inputs(requests)
        scores = self.scores(texts) if texts else torch.empty(0)
        per_request = split_per_request(requests, scores)
        return [[self._format(row, k) for row in rows] for rows, k in zip(per_request, top_ks, strict=True)]

    def _top_k(self, parameters: dict[str, Any]) -> int | None:
        reject_unknown(parameters, ("top_k",), "text-classification")
        value = parameters.get("top_k")
        return None if value is None else as_int("top_k", value, 1)

    def scores(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), num_labels) probabilities."""
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(
            self.model.device
        )
        with torch.inference_mode():
            logits = self.model(**encoded).logits.float()
        return (logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)).cpu()

    def _format(self, row: torch.Tensor, top_k: int | None) -> Any:
        values, indices = row.topk(min(top_k or 1, len(self.labels)))
        ranked = [
            {"label": self.labels[index], "score": value}
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        return ranked if top_k is not None else ranked[0]


def create_runner(loaded: LoadedModel) -> ClassificationRunner:
    return ClassificationRunner(loaded)
