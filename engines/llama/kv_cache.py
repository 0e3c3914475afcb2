"""A KV cache allocated once, with one fixed row ("slot") per concurrent sequence.

Allocating every layer's K and V up front means a decode step never allocates or concatenates cache
memory: it writes the new token's K/V in place and attends over a view of the rows in use. Slots are
handed out lowest-first so the active ones stay compact and that view stays small.
"""

from __future__ import annotations

import heapq

import torch


class SlotKVCache:
    """Per layer K and V of shape [num_slots, num_kv_heads, max_model_len, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_model_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers, self.num_slots, self.max_model_len = num_layers, num_slots, max_model_len
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        shape = (num_slots, num_kv_heads, max_model_len, head_dim)
        # Zeros, not empty: attention reads masked (never written) positions of a row, and garbage
        # NaN/inf bits there would leak through `0 * NaN` even though their weight is zero.
        self.keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._free = list(range(num_slots))  # a heap: allocate() returns the lowest free slot
        self._used: set[int] = set()

    @staticmethod
    def slot_bytes(
        num_layers: int, max_model_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one slot takes across all layers, K and V."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * max_model_len * head_dim * itemsize

    @classmethod
    def slots_for_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        max_model_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        """How many slots of `max_model_len` tokens fit in `budget_bytes` (0 if not even one)."""
        return max(
            0, budget_bytes // cls.slot_bytes(num_layers, max_model_len, num_kv_heads, head_dim, dtype)
        )

    def bytes_per_slot(self) -> int:
        return self.slot_bytes(
            self.num_layers, self.max_model_len, self.num_kv_heads, self.head_dim, self.dtype
        )

    def total_bytes(self) -> int:
        return self.bytes_per_slot() * self.num_slots

    def allocate(self) -> int:
        """Take the lowest free slot; raises RuntimeError when all slots are in use."""
        if not self._free:
            raise RuntimeError(f"All {self.num_slots} KV cache slots are in use")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        """Return `slot`; its stale contents are harmless because lengths say what is valid."""
        if slot not in self._used:
            raise ValueError(f"KV cache slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of every layer's K/V from slot ``src`` to ``dst``
        (the n completions of one prompt share its prefill)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length].copy_(cache[src, :, :length])

    def num_free(self) -> int:
        return len(self._free)
