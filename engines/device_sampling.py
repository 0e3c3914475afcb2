"""Next-token selection as one batched operation on the logits' device (the GPU engine's sampler).

Per row the semantics and order are engines.sampling.sample_next's. ``SamplingTensors.build`` uploads a
step's settings in two host->device copies; ``sample_batch`` runs every row at once without syncing;
``to_host`` brings the chosen tokens and log-probabilities back in one device->host copy. Processed
logits, log-probabilities, greedy picks and the set of tokens that survive temperature, min_p, top-k and
top-p are those of sample_next; a draw matches it in distribution only (an exponential race, not
torch.multinomial), so seeded outputs differ from the CPU sampler's while staying reproducible.
"""

from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import torch

from engines.device import upload
from engines.sampling import Sampled, SamplingState
from engines.sequence import SEED_MODULUS
from engines.types import SamplingParams

COLUMNS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "do_sample",
)
"""The per-row settings, in the order of the uploaded [rows, len(COLUMNS)] table."""


class SampledBatch(NamedTuple):
    """A step's choices, still on the device; ``to_host`` copies them back."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, of the processed distribution (before temperature)
    top_ids: torch.Tensor  # [B, K] int64, most likely first
    top_logprobs: torch.Tensor  # [B, K] float32


@dataclass
class RowIds:
    """Per-row (id, value) lists of one kind, flattened for the upload; rows come back from lengths."""

    lengths: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, ids: abc.Iterable[int], values: abc.Iterable[float] = ()) -> None:
        before = len(self.ids)
        self.ids.extend(ids)
        self.values.extend(values)
        self.lengths.append(len(self.ids) - before)


@dataclass
class SamplingTensors:
    """A step's per-row settings on the logits' device; neutral values where a filter is off."""

    temperature: torch.Tensor  # [B, 1]; 1 on greedy rows
    top_p: torch.Tensor  # [B, 1]; inf where off
    min_p: torch.Tensor  # [B, 1]; 0 where off
    repetition_penalty: torch.Tensor  # [B, 1]
    presence_penalty: torch.Tensor  # [B, 1]
    frequency_penalty: torch.Tensor  # [B, 1]
    top_k: torch.Tensor  # [B, 1] int64; 0 where off (also when >= vocab)
    do_sample: torch.Tensor  # [B] bool
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(rows, ids, values) of logit_bias."""
    blocked: tuple[torch.Tensor, torch.Tensor] | None = None
    """(rows, ids) set to -inf while min_new_tokens holds back EOS and stop_token_ids."""
    seen: torch.Tensor | None = None
    """[B, vocab] bool: prompt or generated ids of the rows with a repetition penalty."""
    counts: torch.Tensor | None = None
    """[B, vocab] float32: generated-token counts of the rows with presence/frequency penalties."""
    any_sample: bool = False
    any_min_p: bool = False
    any_top_k: bool = False
    any_top_p: bool = False

    @classmethod
    def build(
        cls, seqs: abc.Sequence[SamplingState], eos_ids: set[int], vocab_size: int, device: torch.device
    ) -> SamplingTensors:
        """The tensors for ``seqs`` (row i for seqs[i]) in one float32 and one int64 host->device copy."""
        settings = [row_settings(s.params, vocab_size) for s in seqs]
        kinds = collect_sparse(seqs, eos_ids, vocab_size)
        floats = [*chain.from_iterable(settings), *kinds.bias.values, *kinds.counts.values]
        ints = [*chain.from_iterable(k.lengths for k in kinds), *chain.from_iterable(k.ids for k in kinds)]
        floats_dev = upload(torch.tensor(floats, dtype=torch.float32), device)
        ints_dev = upload(torch.tensor(ints, dtype=torch.int64), device)
        table = floats_dev[: len(seqs) * len(COLUMNS)].view(len(seqs), len(COLUMNS))
        columns = {name: table[:, j : j + 1] for j, name in enumerate(COLUMNS)}
        columns["top_k"] = columns["top_k"].long()
        columns["do_sample"] = columns["do_sample"][:, 0] > 0
        sparse = unpack_sparse(kinds, floats_dev[table.numel() :], ints_dev, vocab_size)
        flags = {flag: any(r[COLUMNS.index(name)] != off for r in settings) for flag, name, off in FLAGS}
        return cls(**columns, **sparse, **flags)


FLAGS = (
    ("any_sample", "do_sample", 0.0),
    ("any_min_p", "min_p", 0.0),
    ("any_top_k", "top_k", 0.0),
    ("any_top_p", "top_p", math.inf),
)
"""(host flag, its column, the column's value that means off): steps that no row needs are skipped."""


class SparseInputs(NamedTuple):
    """A step's sparse per-row lists, one upload for all four kinds."""

    bias: RowIds
    blocked: RowIds
    seen: RowIds
    counts: RowIds


def row_settings(params: SamplingParams, vocab_size: int) -> list[float]:
    """One row's COLUMNS; a greedy row gets neutral filters (sample_next ignores them there)."""
    penalties = [params.repetition_penalty, params.presence_penalty, params.frequency_penalty]
    if not params.do_sample:
        return [1.0, math.inf, 0.0, *penalties, 0.0, 0.0]
    top_k = params.top_k if 0 < params.top_k < vocab_size else 0
    top_p = params.top_p if params.top_p < 1.0 else math.inf
    return [params.temperature, top_p, params.min_p, *penalties, float(top_k), 1.0]


def collect_sparse(seqs: abc.Sequence[SamplingState], eos_ids: set[int], vocab_size: int) -> SparseInputs:
    """Per row: logit_bias, the min_new_tokens block, penalized ids, generated counts (empty when unused)."""
    kinds = SparseInputs(RowIds(), RowIds(), RowIds(), RowIds())
    for seq in seqs:
        params = seq.params
        pairs = [(t, b) for t, b in params.logit_bias if t < vocab_size]
        kinds.bias.add((t for t, _ in pairs), (b for _, b in pairs))
        stops = (*eos_ids, *params.stop_token_ids) if seq.blocks_eos() else ()
        kinds.blocked.add(t for t in stops if t < vocab_size)
        kinds.seen.add(seq.penalized_ids() if params.repetition_penalty != 1.0 else ())
        penalized = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        counted = seq.output_counts if penalized else {}
        kinds.counts.add(counted.keys(), map(float, counted.values()))
    return kinds


def unpack_sparse(
    kinds: SparseInputs, values: torch.Tensor, ints: torch.Tensor, vocab_size: int
) -> dict[str, Any]:
    """SamplingTensors' sparse fields from the uploaded lengths, ids and values (all on the device)."""
    index = row_indices(kinds, ints)
    num_rows, num_bias = len(kinds.bias.lengths), len(kinds.bias.values)
    out: dict[str, Any] = {}
    if "bias" in index:
        out["bias"] = (*index["bias"], values[:num_bias])
    if "blocked" in index:
        out["blocked"] = index["blocked"]
    if "seen" in index:
        ones = torch.ones((), dtype=torch.bool, device=ints.device)
        out["seen"] = dense(index["seen"], ones, num_rows, vocab_size)
    if "counts" in index:
        out["counts"] = dense(index["counts"], values[num_bias:], num_rows, vocab_size)
    return out


def row_indices(kinds: SparseInputs, ints: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(rows, ids) of every non-empty kind; rows are rebuilt with repeat_interleave, whose output size is
    known on the host, so nothing syncs."""
    num_rows = len(kinds.bias.lengths)
    lengths = ints[: num_rows * len(kinds)].view(len(kinds), num_rows)
    rows = torch.arange(num_rows, device=ints.device)
    index = {}
    start = lengths.numel()
    for kind, (name, entries) in enumerate(zip(SparseInputs._fields, kinds, strict=True)):
        total = len(entries.ids)
        if total:
            ids = ints[start : start + total]
            index[name] = (rows.repeat_interleave(lengths[kind], output_size=total), ids)
        start += total
    return index


def dense(
    index: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, rows: int, vocab: int
) -> torch.Tensor:
    """A [rows, vocab] tensor of zeros with ``values`` scattered at ``index``."""
    zeros = torch.zeros(rows, vocab, dtype=values.dtype, device=values.device)
    return zeros.index_put_(index, values)


def process_logits(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """logit_bias, the min_new_tokens block, repetition then presence/frequency penalties; ``logits`` is
    not modified (returned as is when no row needs processing)."""
    t = tensors
    if t.bias is None and t.blocked is None and t.seen is None and t.counts is None:
        return logits
    logits = logits.clone()
    if t.bias is not None:
        rows, ids, values = t.bias
        logits[rows, ids] += values  # as sample_next: a repeated id gets one of its biases
    if t.blocked is not None:
        logits[t.blocked] = -math.inf
    if t.seen is not None:
        penalty = t.repetition_penalty
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(t.seen, penalized, logits)
    if t.counts is not None:
        penalty = t.presence_penalty + t.frequency_penalty * t.counts
        logits = logits - torch.where(t.counts > 0, penalty, 0.0)
    return logits


def filter_logits(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """Processed logits after temperature, min_p, top-k and top-p; dropped tokens are -inf.

    Per sampled row this equals sample_next's ``draw`` before its multinomial; greedy rows come back
    unfiltered.
    """
    t = tensors
    logits = logits / t.temperature
    if t.any_min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < t.min_p * probs.amax(-1, keepdim=True), -math.inf)
    if t.any_top_k or t.any_top_p:
        logits = filter_sorted(logits, t)
    return logits


def filter_sorted(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Top-k then top-p with one descending sort (engines.sampling.filter_top_k_top_p, batched)."""
    ordered, order = logits.sort(-1, descending=True)
    if t.any_top_k:
        # The k-th largest value, not rank < k: ties with it survive, as with filter_top_k_top_p.
        kth = ordered.gather(-1, (t.top_k - 1).clamp_min(0)).masked_fill(t.top_k == 0, -math.inf)
        ordered = ordered.masked_fill(ordered < kth, -math.inf)
    if t.any_top_p:
        probs = ordered.softmax(-1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= t.top_p, -math.inf)  # keeps the crossing
    return torch.empty_like(logits).scatter_(-1, order, ordered)


def draw(filtered: torch.Tensor, generators: abc.Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row by exponential race: argmax(p / E), E ~ Exp(1), picks token i with probability
    p_i. Unseeded rows share one noise tensor; a seeded row draws its own from its generator, so its
    token depends on its generator and its logits alone, never on the batch."""
    probs = filtered.softmax(-1)
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row] = seeded_noise(generator, probs.shape[-1], probs.device)
    return probs.div_(noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(-1)


def seeded_noise(generator: torch.Generator, size: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise from ``generator``, drawn on its device; one on another device costs a copy a row."""
    noise = torch.empty(size, device=generator.device).exponential_(generator=generator)
    return noise.to(device, non_blocking=True)


def sample_batch(
    logits: torch.Tensor,
    tensors: SamplingTensors,
    generators: abc.Sequence[torch.Generator | None],
    max_top_logprobs: int,
) -> SampledBatch:
    """Every row's next token from ``logits`` [B, vocab] (float32, any device), with no host sync.

    ``generators[i]`` is row i's seeded generator (ideally on the logits' device) or None.
    """
    processed = process_logits(logits, tensors)
    logprobs = processed.log_softmax(-1)
    tokens = processed.argmax(-1)
    if tensors.any_sample:
        drawn = draw(filter_logits(processed, tensors), generators)
        tokens = torch.where(tensors.do_sample, drawn, tokens)
    top_logprobs, top_ids = logprobs.topk(min(max_top_logprobs, logprobs.shape[-1]), -1)
    return SampledBatch(tokens, logprobs.gather(-1, tokens[:, None])[:, 0], top_ids, top_logprobs)


class HostCopy(NamedTuple):
    """A step's choices on their way to the host: ``rows`` is filled once ``ready`` has fired."""

    rows: torch.Tensor  # [B, 2 + 2k] float64 on the host (pinned when it comes from a GPU)
    k: int
    wanted: tuple[int, ...]
    ready: Any = None  # torch.cuda.Event, None when the copy was synchronous


def copy_to_host(batch: SampledBatch, wanted: abc.Sequence[int]) -> HostCopy:
    """Start the step's one device->host copy (everything packed into float64, exact for ids and float32
    values) without waiting for it: the host can prepare the next step meanwhile."""
    k = min(max(wanted, default=0), batch.top_ids.shape[-1])
    parts = (
        batch.token_ids[:, None],
        batch.logprobs[:, None],
        batch.top_ids[:, :k],
        batch.top_logprobs[:, :k],
    )
    packed = torch.cat([part.to(torch.float64) for part in parts], -1)
    if packed.device.type != "cuda":
        return HostCopy(packed, k, tuple(wanted))
    rows = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    rows.copy_(packed, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return HostCopy(rows, k, tuple(wanted), ready)


def read_host(copy: HostCopy) -> list[Sampled]:
    """The rows as engines.sampling.Sampled, row i with its ``wanted[i]`` top alternatives (waits for
    this copy only, not for steps queued after it)."""
    if copy.ready is not None:
        copy.ready.synchronize()
    rows = copy.rows.tolist()
    return [unpack_row(row, copy.k, w) for row, w in zip(rows, copy.wanted, strict=True)]


def to_host(batch: SampledBatch, wanted: abc.Sequence[int]) -> list[Sampled]:
    """copy_to_host then read_host: the choices on the host now."""
    return read_host(copy_to_host(batch, wanted))


def unpack_row(row: list[float], k: int, wanted: int) -> Sampled:
    """One packed row [token, logprob, k top ids, k top logprobs], keeping ``wanted`` alternatives."""
    top = zip(map(int, row[2 : 2 + wanted]), row[2 + k : 2 + k + wanted], strict=True)
    return Sampled(int(row[0]), row[1], tuple(top))


def device_generator(params: SamplingParams, index: int, device: torch.device) -> torch.Generator | None:
    """A seeded sampled completion's generator on ``device`` (seed + index, as Sequence's); else None.

    The engine keeps it across steps; a CUDA generator's stream differs from the CPU one's of the same seed.
    """
    if not params.do_sample or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed((params.seed + index) % SEED_MODULUS)
