"""BlockManager: block allocation, the SHA-256-chained prefix cache, reference counts and LRU eviction."""

from __future__ import annotations

import pytest

from engines.paging.block_manager import ROOT_HASH, BlockManager, block_hash

SIZE = 4


def _sealed(manager: BlockManager, tokens: list[int]) -> list[int]:
    """A sequence that computed ``tokens`` in fresh blocks, every full block sealed (as the planner does)."""
    blocks = manager.allocate(manager.blocks_for(len(tokens)))
    parent = ROOT_HASH
    for index in range(len(tokens) // SIZE):
        parent = manager.seal(blocks[index], parent, tokens[index * SIZE : (index + 1) * SIZE])
    return blocks


def test_allocation_takes_low_ids_first_and_fails_whole() -> None:
    manager = BlockManager(5, SIZE)
    assert manager.blocks_for(0) == 0
    assert [manager.blocks_for(n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert manager.allocate(2) == [0, 1]
    assert manager.allocate(4) is None  # 3 free: nothing is taken
    assert manager.num_free() == 3
    assert manager.allocate(3) == [2, 3, 4]
    assert manager.num_free() == 0
    assert manager.allocate(1) is None
    manager.release([0, 1])
    assert manager.num_free() == 2
    assert manager.allocate(2) == [0, 1]  # unsealed blocks go straight back to the free list


def test_releasing_a_block_twice_raises() -> None:
    manager = BlockManager(2, SIZE)
    (block,) = manager.allocate(1)
    manager.release([block])
    with pytest.raises(ValueError, match="released more often than it was held"):
        manager.release([block])


@pytest.mark.parametrize(("blocks", "size"), [(0, 16), (4, 0)])
def test_empty_cache_is_refused(blocks: int, size: int) -> None:
    with pytest.raises(ValueError, match="Need one block"):
        BlockManager(blocks, size)


def test_prefix_match_takes_full_blocks_only_and_leaves_a_token_to_compute() -> None:
    manager = BlockManager(8, SIZE)
    prompt = list(range(10, 22))  # 12 tokens: three full blocks
    blocks = _sealed(manager, prompt)
    assert manager.num_cached() == 3
    # the whole prompt again: its last block is never matched, so the last token is computed
    hit, keys = manager.match_prefix(prompt)
    assert hit == blocks[:2]
    assert keys == [block_hash(ROOT_HASH, prompt[:4]), block_hash(keys[0], prompt[4:8])]
    assert manager.match_prefix(prompt + [99])[0] == blocks  # one more token: all three match
    assert manager.match_prefix(prompt[:7])[0] == blocks[:1]  # the second block is not full here
    assert manager.match_prefix(prompt[:4])[0] == []
    assert manager.match_prefix(prompt[:5])[0] == blocks[:1]
    assert manager.match_prefix([10, 11, 12, 0, 14, 15, 16, 17, 1])[0] == []  # differs in block 0


def test_hash_chain_keys_a_block_by_everything_before_it() -> None:
    manager = BlockManager(8, SIZE)
    _sealed(manager, [1, 2, 3, 4, 5, 6, 7, 8])
    assert manager.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 0])[0] == []  # same block 1, other block 0
    assert manager.match_prefix([5, 6, 7, 8, 0])[0] == []  # block 1's tokens as a first block
    assert block_hash(ROOT_HASH, [5, 6, 7, 8]) != block_hash(
        block_hash(ROOT_HASH, [1, 2, 3, 4]), [5, 6, 7, 8]
    )


def test_shared_blocks_are_reference_counted() -> None:
    manager = BlockManager(4, SIZE)
    prompt = list(range(9))
    blocks = _sealed(manager, prompt)  # 3 blocks, two sealed
    hit, _ = manager.match_prefix(prompt)  # a second sequence holds the two sealed ones
    assert hit == blocks[:2]
    manager.hold(hit)  # and a fork of it
    assert manager.num_free() == 1
    manager.release(blocks)  # the first sequence ends: only its private tail block comes back
    assert manager.num_free() == 2
    manager.release(hit)
    assert manager.num_free() == 2  # the fork still holds them
    manager.release(hit)
    assert manager.num_free() == 4  # cached, unheld: free to take, still matchable
    assert manager.num_cached() == 2
    assert manager.match_prefix(prompt)[0] == blocks[:2]


def test_identical_blocks_computed_twice_keep_one_cache_entry() -> None:
    manager = BlockManager(4, SIZE)
    first, second = _sealed(manager, [1, 2, 3, 4]), _sealed(manager, [1, 2, 3, 4])
    assert manager.num_cached() == 1
    assert manager.match_prefix([1, 2, 3, 4, 5])[0] == first
    manager.release(second)  # private: straight back to the free list, not evictable
    manager.release(first)
    manager.release(first)  # the match's hold
    assert manager.allocate(3) == [1, 2, 3]  # the private one and never-used ones before the cached one
    assert manager.num_cached() == 1


def test_cached_blocks_are_evicted_least_recently_released_first_tail_before_head() -> None:
    manager = BlockManager(6, SIZE)
    old = _sealed(manager, list(range(100, 112)))  # blocks 0 1 2
    new = _sealed(manager, list(range(200, 212)))  # blocks 3 4 5
    manager.release(old)
    manager.release(new)
    assert manager.num_free() == 6
    assert manager.num_cached() == 6
    # the first allocations evict the old sequence's blocks, its tail first, then the new one's
    assert manager.allocate(2) == [old[2], old[1]]
    assert manager.num_cached() == 4
    assert manager.match_prefix(list(range(100, 113)))[0] == [old[0]]  # its head is still cached
    manager.release([old[0]])  # released again: now the most recently released
    assert manager.allocate(3) == [new[2], new[1], new[0]]
    assert manager.allocate(1) == [old[0]]
    assert manager.num_cached() == 0
    assert manager.match_prefix(list(range(200, 213)))[0] == []


def test_a_matched_block_is_not_evicted_while_held() -> None:
    manager = BlockManager(3, SIZE)
    blocks = _sealed(manager, list(range(12)))
    manager.release(blocks)
    hit, _ = manager.match_prefix(list(range(13)))
    assert hit == blocks
    assert manager.num_free() == 0
    assert manager.allocate(1) is None


def test_never_used_blocks_are_taken_before_any_cached_one_is_evicted() -> None:
    manager = BlockManager(4, SIZE)
    manager.release(_sealed(manager, [1, 2, 3, 4]))
    assert manager.allocate(3) == [1, 2, 3]
    assert manager.num_cached() == 1
    assert manager.allocate(1) == [0]  # only now is the cached block evicted
    assert manager.num_cached() == 0


def test_stats_count_what_the_caller_records() -> None:
    manager = BlockManager(8, SIZE)
    prompt = list(range(10))
    manager.match_prefix(prompt)
    _sealed(manager, prompt)
    blocks, _ = manager.match_prefix(prompt)
    assert manager.stats.queried_tokens == 0  # a lookup is not a start: the planner records starts
    manager.record_lookup(len(prompt), len(blocks) * SIZE)
    assert (manager.stats.queried_tokens, manager.stats.hit_tokens) == (10, 8)


def test_without_prefix_caching_nothing_is_kept() -> None:
    manager = BlockManager(3, SIZE, enable_prefix_caching=False)
    prompt = list(range(9))
    blocks = _sealed(manager, prompt)
    assert manager.num_cached() == 0
    assert manager.match_prefix(prompt) == ([], [])
    manager.release(blocks)
    assert manager.allocate(3) == [0, 1, 2]
    assert manager.stats.queried_tokens == 0
