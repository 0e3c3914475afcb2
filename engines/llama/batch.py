"""One forward step's inputs: the new tokens of every sequence packed together, plus their cache places.

Everything attention needs that depends only on the batch (block tables, per-token sequence and key
counts, where each new K/V row goes) is built here once per step, so the 30-odd layers of a forward pass
reuse it instead of rebuilding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from engines.device import upload
from engines.kernels.paged import PagedAttentionMeta


@dataclass
class ForwardBatch:
    """The new tokens of all sequences packed into [T], with each sequence's block table and lengths."""

    token_ids: torch.Tensor
    """[T] int64: each prefilling sequence's chunk, each decoding sequence's one token."""
    positions: torch.Tensor
    """[T] int64 position of each token in its sequence."""
    block_tables: list[list[int]]
    query_lens: list[int]
    """New tokens per sequence (sums to T)."""
    context_lens: list[int]
    """Tokens in the cache per sequence after this step (earlier tokens + this step's)."""
    block_size: int
    meta: PagedAttentionMeta = field(init=False)
    token_blocks: torch.Tensor = field(init=False)
    """[T] int64 cache block each token's K/V is written to."""
    token_offsets: torch.Tensor = field(init=False)
    """[T] int64 row within that block."""
    last_rows: torch.Tensor = field(init=False)
    """[num_seqs] row of each sequence's last token: the only rows that get logits."""

    def __post_init__(self) -> None:
        self._validate()
        device = self.token_ids.device
        meta = PagedAttentionMeta.build(self.block_tables, self.query_lens, self.context_lens)  # on CPU
        size, blocks, offsets = self.block_size, [], []
        for table, new, context in zip(self.block_tables, self.query_lens, self.context_lens, strict=True):
            for position in range(context - new, context):  # from the lists: no device-to-host copy
                blocks.append(table[position // size])
                offsets.append(position % size)
        self.token_blocks = upload(torch.tensor(blocks, dtype=torch.int64), device)
        self.token_offsets = upload(torch.tensor(offsets, dtype=torch.int64), device)
        self.last_rows = upload(
            torch.tensor(list(accumulate(self.query_lens)), dtype=torch.int64) - 1, device
        )
        self.meta = meta.to(device)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def _validate(self) -> None:
        count = len(self.block_tables)
        if not (len(self.query_lens) == len(self.context_lens) == count > 0):
            raise ValueError("block_tables, query_lens and context_lens must be non-empty and equally long")
        if sum(self.query_lens) != self.token_ids.numel() or self.positions.shape != self.token_ids.shape:
            raise ValueError("token_ids and positions must hold sum(query_lens) tokens")
        if any(q < 1 or c < q for q, c in zip(self.query_lens, self.context_lens, strict=True)):
            raise ValueError("Every sequence needs 1 <= query_len <= context_len")
        for table, context in zip(self.block_tables, self.context_lens, strict=True):
            if len(table) * self.block_size < context:
                raise ValueError(f"{len(table)} blocks of {self.block_size} cannot hold {context} tokens")

    def split(self, parts: int) -> list[ForwardBatch]:
        """Up to ``parts`` micro-batches of whole sequences, in order, with about equal token counts
        (pipeline stages work on one while the next stage works on the one before)."""
        count = min(parts, self.num_seqs)
        if count <= 1:
            return [self]
        total, bounds, acc = sum(self.query_lens), [0], 0
        for index, length in enumerate(self.query_lens):
            acc += length
            left = self.num_seqs - index - 1
            wanted = len(bounds)  # the boundary we are looking for
            if wanted < count and (acc >= total * wanted / count or left == count - wanted):
                bounds.append(index + 1)
        bounds.append(self.num_seqs)
        out, token = [], 0
        for start, stop in zip(bounds, bounds[1:], strict=False):
            size = sum(self.query_lens[start:stop])
            out.append(
                ForwardBatch(
                    token_ids=self.token_ids[token : token + size],
                    positions=self.positions[token : token + size],
                    block_tables=self.block_tables[start:stop],
                    query_lens=self.query_lens[start:stop],
                    context_lens=self.context_lens[start:stop],
                    block_size=self.block_size,
                )
            )
            token += size
        return out

    @classmethod
    def from_tensors(
        cls,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: PagedAttentionMeta,
        token_blocks: torch.Tensor,
        token_offsets: torch.Tensor,
        last_rows: torch.Tensor,
        block_size: int,
    ) -> ForwardBatch:
        """A decode batch over ready device tensors (a CUDA graph's static buffers): nothing is built
        or copied, so the tensors the graph captured are the ones later steps overwrite."""
        batch = cls.__new__(cls)
        count = token_ids.shape[0]
        batch.token_ids, batch.positions, batch.meta = token_ids, positions, meta
        batch.block_tables, batch.query_lens, batch.context_lens = [], [1] * count, [1] * count
        batch.block_size, batch.token_blocks, batch.token_offsets = block_size, token_blocks, token_offsets
        batch.last_rows = last_rows
        return batch

    @classmethod
    def build(
        cls,
        seqs: Sequence[tuple[Sequence[int], Sequence[int], int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """Pack `(block_table, new_token_ids, start_pos)` per sequence; start_pos = tokens already cached."""
        token_ids: list[int] = []
        positions: list[int] = []
        for _, new_ids, start in seqs:
            token_ids.extend(new_ids)
            positions.extend(range(start, start + len(new_ids)))
        return cls(
            token_ids=upload(torch.tensor(token_ids, dtype=torch.int64), device),
            positions=upload(torch.tensor(positions, dtype=torch.int64), device),
            block_tables=[list(table) for table, _, _ in seqs],
            query_lens=[len(new_ids) for _, new_ids, _ in seqs],
            context_lens=[start + len(new_ids) for _, new_ids, start in seqs],
            block_size=block_size,
        )
