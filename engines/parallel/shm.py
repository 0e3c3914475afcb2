"""All-reduce and all-gather through shared memory for the ranks of a tensor-parallel group on one CPU
machine: the step's dozens of small all-reduces (two per layer) cost microseconds instead of a gloo
round trip over loopback TCP each.

Each rank owns a slot in a /dev/shm file mapped by every rank of the group. A collective writes the
rank's tensor into its slot, publishes the call number in its own flag (one writer per flag; x86 keeps
stores in order, so the data is visible before the flag), waits until every flag has reached it, and
sums (or concatenates) the slots in rank order, so every rank gets bit-identical results. Two slot sets
alternate: a rank may overwrite set k % 2 at call k because every rank has published call k - 1, which it
only does after reading call k - 2. Tensors larger than a slot go through gloo instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

SLOT_BYTES = 16 << 20
"""Per rank and buffer: a 4,096-token prefill chunk of a 2,048-wide fp16 model, or 64 rows of logits."""
SPINS_BEFORE_YIELD = 200
TIMEOUT_S = 600.0


class ShmGroup:
    """The shared slots of one tensor-parallel group; ``rank`` is the rank's index inside the group."""

    def __init__(self, path: Path, ranks: int, rank: int, create: bool) -> None:
        self.ranks, self.rank = ranks, rank
        flag_bytes = 64 * ranks  # one cache line per flag
        size = flag_bytes + 2 * ranks * SLOT_BYTES
        if create:
            with path.open("wb") as handle:
                handle.truncate(size)
        storage = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
        self.flags = storage[:flag_bytes].view(torch.int64)[:: 64 // 8]  # [ranks], 64 bytes apart
        self.data = storage[flag_bytes:]
        self.calls = 0
        self._storage = storage

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= SLOT_BYTES and tensor.device.type == "cpu"

    def _slots(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's slot of this call's buffer, viewed as ``tensor``'s dtype and shape."""
        nbytes = tensor.numel() * tensor.element_size()
        base = (self.calls % 2) * self.ranks * SLOT_BYTES
        return [
            self.data[base + r * SLOT_BYTES : base + r * SLOT_BYTES + nbytes]
            .view(tensor.dtype)
            .view(tensor.shape)
            for r in range(self.ranks)
        ]

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        slots = self._slots(tensor)
        slots[self.rank].copy_(tensor)
        self.flags[self.rank] = self.calls
        spins, deadline = 0, None
        while int(self.flags.min()) < self.calls:
            spins += 1
            if spins > SPINS_BEFORE_YIELD:
                os.sched_yield()  # more ranks than free cores: let the others run
                if deadline is None:
                    deadline = time.monotonic() + TIMEOUT_S
                elif time.monotonic() > deadline:
                    raise RuntimeError(
                        f"shared-memory all-reduce: a rank did not arrive in {TIMEOUT_S:.0f} s"
                    )
        return slots

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group into ``tensor`` (rank order, identical on every rank)."""
        slots = self._exchange(tensor.contiguous())
        torch.add(slots[0], slots[1], out=tensor)
        for slot in slots[2:]:
            tensor.add_(slot)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(tensor.contiguous()), dim=-1)
