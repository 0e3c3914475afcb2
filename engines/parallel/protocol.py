"""What rank 0 tells the other ranks before each collective operation: plain lists, no tensors but the
token ids (broadcast as a tensor so that ids still on the device need no copy to the host)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.llama.batch import ForwardBatch

STEP, COPY, STOP = "step", "copy", "stop"


@dataclass
class Command:
    """One thing every rank does next, in the same order on every rank."""

    kind: str
    block_tables: list[list[int]] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    rows: list[int] | None = None
    """Packed rows whose logits rank 0 wants (None: each sequence's last)."""
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """COPY: (source block, destination block)."""

    @classmethod
    def step(cls, batch: ForwardBatch, rows: torch.Tensor | None) -> Command:
        return cls(
            STEP,
            batch.block_tables,
            batch.query_lens,
            batch.context_lens,
            None if rows is None else rows.tolist(),
        )

    def batch(self, token_ids: torch.Tensor, block_size: int) -> ForwardBatch:
        """The same ForwardBatch rank 0 built, around the broadcast ``token_ids``."""
        positions = [
            p for q, c in zip(self.query_lens, self.context_lens, strict=True) for p in range(c - q, c)
        ]
        return ForwardBatch(
            token_ids=token_ids,
            positions=torch.tensor(positions, dtype=torch.int64).to(token_ids.device),
            block_tables=self.block_tables,
            query_lens=self.query_lens,
            context_lens=self.context_lens,
            block_size=block_size,
        )
