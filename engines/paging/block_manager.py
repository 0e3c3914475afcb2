"""Which KV-cache blocks each sequence owns, and the automatic prefix cache over them (no torch here).

Blocks are fixed-size pages of the cache. A sequence takes blocks as it grows and returns them when it
ends or is preempted. A block whose every token is computed can be *sealed*: it is keyed by a hash chain
of its tokens (the previous block's key and its own ids), so a later prompt that starts with the same
tokens reuses it instead of computing it again. Sealed blocks are shared read-only and reference-counted;
when no sequence holds one it stays cached, and the least recently released is evicted only when a fresh
block is needed. The hash is SHA-256: token ids are user-chosen, and a collision would let one request
read another's cache.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = b""
"""The chain's parent for a sequence's first block."""


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: depends on every token before it through ``parent``."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the prefix cache and those found there (since start)."""

    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    """Allocator and prefix cache for ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"Need one block of at least one token, not {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self._refs = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        """Sealed block key -> block, held or not."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Sealed blocks no sequence holds, least recently released first."""
        self.stats = PrefixStats()

    def num_free(self) -> int:
        """Blocks a sequence can take now: never used, or cached but unheld (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    def num_cached(self) -> int:
        """Sealed blocks, held or not."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks a prompt starts with (each now held once more) and their keys.

        At least the prompt's last token is left to compute: the step that computes it yields the
        first generated token's logits."""
        if not self.enable_prefix_caching:
            return [], []
        blocks, keys, parent = [], [], ROOT_HASH
        usable = (len(token_ids) - 1) // self.block_size
        for index in range(usable):
            key = block_hash(parent, token_ids[index * self.block_size : (index + 1) * self.block_size])
            block = self._cached.get(key)
            if block is None:
                break
            self._hold(block)
            blocks.append(block)
            keys.append(key)
            parent = key
        return blocks, keys

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one prompt's lookup in the stats (once per prompt, however long it waited)."""
        self.stats.queried_tokens += queried_tokens
        self.stats.hit_tokens += hit_tokens

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks, evicting unheld cached ones if needed; None (and nothing taken) when
        fewer than ``count`` are available."""
        if count > self.num_free():
            return None
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._key[block]]
                self._key[block] = None
            self._refs[block] = 1
            taken.append(block)
        return taken

    def seal(self, block: int, parent: bytes, token_ids: Sequence[int]) -> bytes:
        """Register a full, computed block under its key; returns the key. If an identical block is
        already cached (two equal prompts computed at once), this one stays private."""
        key = block_hash(parent, token_ids)
        if self.enable_prefix_caching and key not in self._cached and self._key[block] is None:
            self._cached[key] = block
            self._key[block] = key
        return key

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence gives its blocks back (last block first, so a prefix's tail is evicted first)."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs < 0:
                raise ValueError(f"KV cache block {block} released more often than it was held")
            self._refs[block] = refs
            if refs == 0:
                if self._key[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def hold(self, blocks: Sequence[int]) -> None:
        """Another sequence shares these (computed, read-only) blocks: the n completions of a prompt."""
        for block in blocks:
            self._hold(block)

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1
