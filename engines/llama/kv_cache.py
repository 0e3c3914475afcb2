"""The paged KV cache's memory: per layer K and V of [num_blocks, kv_heads, block_size, head_dim].

Allocated once at start-up from a memory budget, so a step never allocates cache memory; which
sequence owns which block is engines/paging/block_manager.py's business. The layout keeps one kv head's
rows of a block contiguous, which is what the CPU kernel streams through.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    """K and V blocks for every layer, on one device."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        # Zeros, not empty: a kernel may load (and mask) rows past a sequence's end, and garbage NaN/inf
        # bits there would leak through `0 * NaN` even though their weight is zero.
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @staticmethod
    def block_bytes(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one block takes across all layers, K and V."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * block_size * head_dim * itemsize

    def bytes_per_block(self) -> int:
        return self.block_bytes(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    def total_bytes(self) -> int:
        return self.bytes_per_block() * self.num_blocks

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block src to block dst in every layer (copy-on-write of a shared last block)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in (*self.keys, *self.values):
            cache[dst] = cache[src]
