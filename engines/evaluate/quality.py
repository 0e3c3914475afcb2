"""Quality of a candidate model against the baseline on the same text: how far its next-token
distributions move (KL divergence, top-1 agreement), perplexity, and multiple-choice accuracy.

Both models are native LlamaModels scoring every position of fixed windows of the corpus in one
forward each (prompt-log-probability rows), so the comparison is exact position by position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.llama.batch import ForwardBatch

DATA = Path(__file__).parent / "data"
DEFAULT_CORPUS = DATA / "corpus.txt"
DEFAULT_CHOICES = DATA / "choices.jsonl"
WINDOW = 256


@dataclass
class Choice:
    """One multiple-choice item: the format of --choices files (JSON lines)."""

    question: str
    choices: list[str]
    answer: int


def read_choices(path: Path) -> list[Choice]:
    """JSON lines of {"question": str, "choices": [str, ...], "answer": index}; ValueError naming the line."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            item = Choice(str(raw["question"]), [str(c) for c in raw["choices"]], int(raw["answer"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected question, choices and answer ({exc})") from exc
        if not 0 <= item.answer < len(item.choices) or len(item.choices) < 2:
            raise ValueError(
                f"{path}:{number}: answer {item.answer} is not an index of its {len(item.choices)} choices"
            )
        items.append(item)
    return items


def position_log_probs(model: Any, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] float32 log-probabilities of each next token, from one forward pass."""
    block = 64
    cache = model.make_cache(-(-len(ids) // block), block)
    batch = ForwardBatch.build([(list(range(cache.num_blocks)), ids, 0)], block, model.device)
    rows = torch.arange(len(ids) - 1, device=model.device)
    return torch.log_softmax(model(batch, cache, rows).float(), dim=-1).cpu()


@dataclass
class Comparison:
    """Accumulated over every scored position."""

    kl: list[float] = field(default_factory=list)
    top1_agree: int = 0
    positions: int = 0
    nll_base: float = 0.0
    nll_candidate: float = 0.0

    def add(self, base: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> None:
        kl = (base.exp() * (base - candidate)).sum(-1).clamp(min=0)
        self.kl.extend(kl.tolist())
        self.top1_agree += int((base.argmax(-1) == candidate.argmax(-1)).sum())
        self.positions += len(targets)
        self.nll_base -= float(base.gather(-1, targets[:, None]).sum())
        self.nll_candidate -= float(candidate.gather(-1, targets[:, None]).sum())

    def summary(self) -> dict[str, float]:
        kl = torch.tensor(self.kl)
        ppl_base = float(torch.exp(torch.tensor(self.nll_base / self.positions)))
        ppl_candidate = float(torch.exp(torch.tensor(self.nll_candidate / self.positions)))
        return {
            "positions": self.positions,
            "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)),
            "top1_agreement": self.top1_agree / self.positions,
            "perplexity_base": ppl_base,
            "perplexity_candidate": ppl_candidate,
            "perplexity_increase": ppl_candidate / ppl_base - 1,
        }


def compare_on_corpus(
    base: Any, candidate: Any, tokenizer: Any, text: str, max_windows: int = 16
) -> dict[str, float]:
    ids = tokenizer(text)["input_ids"]
    comparison = Comparison()
    limit = min(WINDOW, base.max_model_len, candidate.max_model_len)
    windows = [ids[i : i + limit] for i in range(0, len(ids), limit)][:max_windows]
    for window in windows:
        if len(window) < 2:
            continue
        targets = torch.tensor(window[1:])
        comparison.add(position_log_probs(base, window), position_log_probs(candidate, window), targets)
    if comparison.positions == 0:
        raise ValueError("The corpus is too short: it needs at least two tokens")
    return comparison.summary()


def choice_accuracy(model: Any, tokenizer: Any, items: list[Choice]) -> float:
    """Share of items whose answer has the highest log-likelihood of its tokens after the question."""
    right = 0
    for item in items:
        prefix = tokenizer(f"Question: {item.question}\nAnswer:")["input_ids"]
        scores = []
        for choice in item.choices:
            ids = prefix + tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            log_probs = position_log_probs(model, ids)
            targets = torch.tensor(ids[len(prefix) :])
            scores.append(float(log_probs[len(prefix) - 1 :].gather(-1, targets[:, None]).sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item.answer)
    return right / len(items)
