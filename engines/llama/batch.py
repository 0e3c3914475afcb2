"""One forward step's inputs: the new tokens of every sequence packed together, plus attention plans.

Everything attention needs that depends only on the batch (index tensors, masks, slot ranges) is
built here at most once per step, so the 30-odd layers of a forward pass reuse it instead of
rebuilding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class DecodePlan:
    """Sequences with one new token, attended together over the cache rows [slot_lo, slot_hi)."""

    token_rows: torch.Tensor
    """[B] rows of these tokens in the packed batch."""
    slot_rows: torch.Tensor
    """[B] slot - slot_lo of each sequence: its row in the cache view."""
    slot_lo: int
    slot_hi: int
    kv_len: int
    """Longest context among these sequences: the cache view covers positions [0, kv_len)."""
    mask: torch.Tensor
    """[slot_hi - slot_lo, 1, 1, kv_len] bool, True where a row may attend; rows of slots not decoding
    this step see only position 0 (their output is discarded; a fully masked row would give NaN)."""
    in_slot_order: bool
    """slot_rows == arange(B) with no gaps: queries map onto the view's rows without scattering."""
    all_tokens: bool
    """These are all the tokens of the batch, in order: outputs need no scattering either."""


@dataclass
class PrefillPlan:
    """One sequence with several new tokens: causal attention over its cache prefix."""

    start: int
    end: int
    """Its tokens are rows [start, end) of the packed batch."""
    slot: int
    context_len: int
    mask: torch.Tensor | None
    """[end - start, context_len] bool for a chunk continuing an earlier prefix; None when the chunk
    starts at position 0 (plain causal attention)."""


@dataclass
class ForwardBatch:
    """The new tokens of all sequences packed into [T], with per-sequence slot and lengths."""

    token_ids: torch.Tensor
    """[T] int64: each prefilling sequence's prompt (chunk), each decoding sequence's one token."""
    positions: torch.Tensor
    """[T] int64 position of each token in its sequence."""
    slots: list[int]
    query_lens: list[int]
    """New tokens per sequence (sums to T)."""
    context_lens: list[int]
    """Tokens in the cache per sequence after this step (earlier tokens + this step's)."""
    token_slots: torch.Tensor = field(init=False)
    """[T] int64 slot of each token, for writing K/V into the cache."""
    token_kv_lens: torch.Tensor = field(init=False)
    """[T] int64 cache positions each token attends (its position + 1: causal)."""
    last_rows: torch.Tensor = field(init=False)
    """[num_seqs] row of each sequence's last token: the only rows that get logits."""

    def __post_init__(self) -> None:
        self._validate()
        device = self.token_ids.device
        lens = torch.tensor(self.query_lens, dtype=torch.int64)
        self.token_slots = torch.repeat_interleave(torch.tensor(self.slots, dtype=torch.int64), lens).to(
            device
        )
        self.token_kv_lens = self.positions + 1
        self.last_rows = (torch.cumsum(lens, 0) - 1).to(device)

    @cached_property
    def decode(self) -> DecodePlan | None:
        """Built on first use: only the SDPA attention path needs the plans."""
        return _decode_plan(self, self.token_ids.device)

    @cached_property
    def prefills(self) -> list[PrefillPlan]:
        return _prefill_plans(self, self.token_ids.device)

    @property
    def num_seqs(self) -> int:
        return len(self.slots)

    def _validate(self) -> None:
        count = len(self.slots)
        if not (len(self.query_lens) == len(self.context_lens) == count > 0):
            raise ValueError("slots, query_lens and context_lens must be non-empty and equally long")
        if len(set(self.slots)) != count:
            raise ValueError(f"A slot appears twice in one batch: {self.slots}")
        if sum(self.query_lens) != self.token_ids.numel() or self.positions.shape != self.token_ids.shape:
            raise ValueError("token_ids and positions must hold sum(query_lens) tokens")
        if any(q < 1 or c < q for q, c in zip(self.query_lens, self.context_lens, strict=True)):
            raise ValueError("Every sequence needs 1 <= query_len <= context_len")

    @classmethod
    def build(
        cls, seqs: Sequence[tuple[int, Sequence[int], int]], device: torch.device | str = "cpu"
    ) -> ForwardBatch:
        """Pack `(slot, new_token_ids, start_pos)` per sequence; start_pos = tokens already cached."""
        token_ids: list[int] = []
        positions: list[int] = []
        for _, new_ids, start in seqs:
            token_ids.extend(new_ids)
            positions.extend(range(start, start + len(new_ids)))
        return cls(
            token_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slots=[slot for slot, _, _ in seqs],
            query_lens=[len(new_ids) for _, new_ids, _ in seqs],
            context_lens=[start + len(new_ids) for _, new_ids, start in seqs],
        )


def _decode_plan(batch: ForwardBatch, device: torch.device) -> DecodePlan | None:
    picked = [i for i, q in enumerate(batch.query_lens) if q == 1]
    if not picked:
        return None
    slots = [batch.slots[i] for i in picked]
    lo, hi = min(slots), max(slots) + 1
    kv_len = max(batch.context_lens[i] for i in picked)
    lengths = torch.ones(hi - lo, dtype=torch.int64)  # slots not decoding now: attend position 0 only
    slot_ids = torch.tensor(slots, dtype=torch.int64)
    kv_lens = torch.tensor([batch.context_lens[i] for i in picked], dtype=torch.int64)
    rows = slot_ids - lo
    lengths[rows] = kv_lens
    mask = torch.arange(kv_len).unsqueeze(0) < lengths.unsqueeze(1)  # [R, kv_len]
    token_rows = (torch.cumsum(torch.tensor(batch.query_lens), 0) - 1)[picked]
    return DecodePlan(
        token_rows=token_rows.to(device),
        slot_rows=rows.to(device),
        slot_lo=lo,
        slot_hi=hi,
        kv_len=kv_len,
        mask=mask.view(hi - lo, 1, 1, kv_len).to(device),
        in_slot_order=slots == list(range(lo, hi)),
        all_tokens=len(picked) == batch.token_ids.numel(),
    )


def _prefill_plans(batch: ForwardBatch, device: torch.device) -> list[PrefillPlan]:
    plans = []
    start = 0
    for slot, q_len, ctx in zip(batch.slots, batch.query_lens, batch.context_lens, strict=True):
        if q_len > 1:
            mask = None
            if ctx > q_len:  # query i sits at position ctx - q_len + i and sees keys up to it
                query_pos = torch.arange(ctx - q_len, ctx).unsqueeze(1)
                mask = (torch.arange(ctx).unsqueeze(0) <= query_pos).to(device)
            plans.append(PrefillPlan(start, start + q_len, slot, ctx, mask))
        start += q_len
    return plans
