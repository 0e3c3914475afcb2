"""LMI generation parameters: parsed, validated and turned into `generate()` keyword arguments.

Like HF, sampling happens only when `do_sample` is true (default false); temperature/top_k/top_p
are ignored otherwise. The frozen, hashable result lets requests with equal parameters share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.hf.tasks.params import (
    as_bool,
    as_float,
    as_int,
    as_str_list,
    invalid,
    reject_unknown,
)

DEFAULT_MAX_NEW_TOKENS = 30
MAX_SEED = 2**63 - 1
KNOWN = (
    "max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "repetition_penalty", "seed",
    "stop_sequences", "return_full_text", "details",
)  # fmt: skip


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    return_full_text: bool = False
    details: bool = False

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`, leaving sampling knobs out when not sampling."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            sampling = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
            kwargs.update({key: value for key, value in sampling.items() if value is not None})
        return kwargs


_PARSERS = {
    "max_new_tokens": lambda v: as_int("max_new_tokens", v, 1),
    "do_sample": lambda v: as_bool("do_sample", v),
    "temperature": lambda v: as_float("temperature", v, "a number >= 0", 0.0, open_low=False),
    "top_k": lambda v: as_int("top_k", v, 0),
    "top_p": lambda v: as_float("top_p", v, "a number in (0, 1]", 0.0, 1.0, open_low=True),
    "repetition_penalty": lambda v: as_float("repetition_penalty", v, "a number > 0", 0.0, open_low=True),
    "seed": lambda v: as_int("seed", v, 0, MAX_SEED),
    "stop_sequences": lambda v: as_str_list("stop_sequences", v),
    "return_full_text": lambda v: as_bool("return_full_text", v),
    "details": lambda v: as_bool("details", v),
}


def parse_generation_params(parameters: dict[str, Any], task: str, *, causal: bool) -> GenerationParams:
    """Validate a request's `parameters`; None values mean "use the default"."""
    reject_unknown(parameters, KNOWN, task)
    values = {name: _PARSERS[name](value) for name, value in parameters.items() if value is not None}
    if values.get("return_full_text") and not causal:
        raise invalid("return_full_text", True, f"false ({task} outputs never contain the input)")
    params = GenerationParams(**values)
    if params.do_sample and params.temperature is not None and params.temperature <= 0:
        raise invalid("temperature", parameters["temperature"], "a number > 0 when do_sample is true")
    return params
