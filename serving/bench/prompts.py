"""Seeded synthetic prompts of a chosen token length, so runs are repeatable and comparable.

Prompt ``i`` depends only on (seed, i): every load row and the baseline see the same prompts, in the
same order, whatever the concurrency. Words are drawn at random (not a repeated sentence) so a server's
prefix cache cannot make the benchmark unrealistically cheap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this be are have had not but "
    "all were when we there can an which their said if do will each about how up out them then she many "
    "some so these would other into has more two time like him see could no make than first been its who "
    "now people my made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man too any day same "
    "right look think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number great tell "
    "men say small every found still between name should home big give air line set own under read last "
    "never us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head above kind "
    "began almost live page got earth need far hand high year mother light parts country father let night "
    "following picture being study second eyes soon times story boys since white days ever paper hard near "
    "sentence better best across during today others sure means however leave river city garden morning"
)
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
"""A fixed vocabulary of common English words: ordinary text that tokenizes like real prompts."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int
    """Measured with the tokenizer when one is given, else the word count (an approximation)."""


def load_tokenizer(path: str) -> Tokenizer:
    """A transformers AutoTokenizer, imported only when asked for (it is slow to import)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class PromptSource:
    """``get(i)``: prompt i, with a length drawn uniformly from [min_tokens, max_tokens]."""

    def __init__(self, min_tokens: int, max_tokens: int, seed: int, tokenizer: Tokenizer | None = None):
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"need 1 <= prompt-len-min <= prompt-len-max, got {min_tokens}..{max_tokens}")
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.seed, self.tokenizer = seed, tokenizer
        self._cache: dict[int, Prompt] = {}

    def get(self, index: int) -> Prompt:
        if index not in self._cache:
            self._cache[index] = self._make(index)
        return self._cache[index]

    def _make(self, index: int) -> Prompt:
        rng = random.Random(self.seed * 1_000_003 + index)
        target = rng.randint(self.min_tokens, self.max_tokens)
        words = [rng.choice(WORDS) for _ in range(target)]
        if self.tokenizer is None:
            return Prompt(" ".join(words), target)
        return self._fit(words, target, rng)

    def _fit(self, words: list[str], target: int, rng: random.Random) -> Prompt:
        """Cut the token ids to ``target`` and decode; re-encoding can differ by a token, so re-measure."""
        tok = self.tokenizer
        assert tok is not None
        while len(tok.encode(" ".join(words), add_special_tokens=False)) < target + 2:
            words.extend(rng.choice(WORDS) for _ in range(max(1, target // 4)))
        ids = tok.encode(" ".join(words), add_special_tokens=False)
        tried = []
        for cut in (target, target - 1, target + 1, target - 2, target + 2):
            text = tok.decode(ids[: max(1, cut)], skip_special_tokens=True)
            prompt = Prompt(text, len(tok.encode(text, add_special_tokens=False)))
            if prompt.tokens == target:
                return prompt
            tried.append(prompt)
        in_range = [p for p in tried if self.min_tokens <= p.tokens <= self.max_tokens]
        return min(in_range or tried, key=lambda p: abs(p.tokens - target))
