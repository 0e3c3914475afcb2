"""feature-extraction: one pooled embedding (list[float]) per input.

Pooling and normalisation follow the model's sentence-transformers files when present
(`modules.json`, `1_Pooling/config.json`), so embeddings match what the model was trained to produce;
plain encoders default to attention-mask-aware mean pooling without normalisation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineLoadError, TaskRequest
from engines.hf.loading import LoadedModel
from engines.hf.tasks.packing import all_inputs, split_per_request
from engines.hf.tasks.params import as_bool, reject_unknown

logger = logging.getLogger("engines.hf")

POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
UNSUPPORTED_KEYS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False


def read_pooling_config(directory: Path) -> PoolingConfig:
    """Pooling mode and normalisation from sentence-transformers files; mean, unnormalised without them."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig()
    modules = json.loads(modules_file.read_text())
    paths = {str(module.get("type", "")).rsplit(".", 1)[-1]: module.get("path", "") for module in modules}
    pooling_file = directory / (paths.get("Pooling") or "1_Pooling") / "config.json"
    mode = _pooling_mode(pooling_file) if pooling_file.is_file() else "mean"
    return PoolingConfig(mode=mode, normalize="Normalize" in paths)


def _pooling_mode(path: Path) -> str:
    settings = json.loads(path.read_text())
    unsupported = [key for key in UNSUPPORTED_KEYS if settings.get(key)]
    modes = [mode for key, mode in POOLING_KEYS.items() if settings.get(key)]
    if unsupported or not modes:
        raise EngineLoadError(
            f"{path}: unsupported pooling {unsupported or settings}; supported: cls, mean, max."
        )
    if len(modes) > 1:
        logger.warning("%s: several pooling modes %s; using %r only", path, modes, modes[0])
    return modes[0]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, tokens, dim) → (batch, dim), ignoring padding (inputs are right-padded)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class EmbeddingRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.tokenizer.padding_side = "right"
        self.pooling = read_pooling_config(loaded.checkpoint.directory)
        limits = [
            self.tokenizer.model_max_length,
            getattr(self.model.config, "max_position_embeddings", None),
        ]
        self.max_length = min(limit for limit in limits if isinstance(limit, int) and limit > 0)

    def run(self, requests: list[TaskRequest]) -> list[list[list[float]]]:
        """All inputs of all requests in one forward pass; normalisation is applied per request."""
        normalize = [self._normalize(request.parameters) for request in requests]
        texts = all_inputs(requests)
        embeddings = self.embed(texts) if texts else torch.empty(0)
        results = []
        for vectors, unit in zip(split_per_request(requests, embeddings), normalize, strict=True):
            if unit and len(vectors):
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            results.append(vectors.tolist())
        return results

    def _normalize(self, parameters: dict[str, Any]) -> bool:
        reject_unknown(parameters, ("normalize",), "feature-extraction")
        value = parameters.get("normalize")
        return self.pooling.normalize if value is None else as_bool("normalize", value)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Pooled float32 embeddings, one row per text."""
        encoded = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        ).to(self.model.device)
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        return pool(hidden, encoded["attention_mask"], self.pooling.mode).float().cpu()


def create_runner(loaded: LoadedModel) -> EmbeddingRunner:
    return EmbeddingRunner(loaded)
