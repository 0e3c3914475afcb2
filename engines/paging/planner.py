"""Which sequences compute which tokens in the next step, within the cache's blocks (no torch here).

Every step, in order: each decoding sequence gets its one token (taking a new block when its last is
full), then sequences still computing their prompts get chunks, oldest first, until the step's prompt
token budget is spent, then waiting sequences start (their prompts first matched against the prefix
cache). When a running sequence needs a block and none is free, the most recently started running
sequence is preempted: its blocks go back, and it waits at the head of the queue to recompute its
prompt and the tokens it generated so far (vLLM's recompute preemption), so no request fails because
the cache filled and a greedy request's output does not change.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from engines.paging.block_manager import ROOT_HASH, BlockManager
from engines.sequence import PENDING, Sequence

log = logging.getLogger("engines.rolling")


@dataclass
class Scheduled:
    """One sequence's part of a step: ``num_tokens`` from position ``seq.num_cached`` on."""

    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the last known token, so the step samples the next one."""
        return self.num_tokens == self.seq.uncomputed()


class StepPlanner:
    """Running and waiting sequences of the paged engine, and the blocks they hold."""

    def __init__(self, blocks: BlockManager, prefill_tokens: int) -> None:
        self.blocks = blocks
        self.prefill_tokens = prefill_tokens
        self.running: list[Sequence] = []
        """Sequences holding blocks, in the order they started (the last one is preempted first)."""
        self.waiting: deque[Sequence] = deque()
        """Sequences holding nothing yet: new, or preempted (at the front)."""
        self.preemptions = 0

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, seq: Sequence, front: bool = False) -> None:
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def plan(self) -> list[Scheduled]:
        """This step's work; allocates the blocks it needs (preempting if it must)."""
        chosen: list[Scheduled] = []
        held: set[int] = set()  # ids of chosen sequences: never preempted for a later one
        for seq in list(self.running):
            decodes = seq.uncomputed() == 1 and not seq.exhausted()  # the last token may be unread
            if seq in self.running and decodes and self._grow(seq, 1, held):
                chosen.append(Scheduled(seq, 1))
                held.add(id(seq))
        budget = self.prefill_tokens
        for seq in [s for s in self.running if s.uncomputed() > 1]:
            granted = self._prefill(seq, budget, held) if budget > 0 else 0
            if granted:
                chosen.append(Scheduled(seq, granted))
                held.add(id(seq))
                budget -= granted
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            self._start(seq)
            granted = self._prefill(seq, budget, held)
            if granted == 0:
                break  # FIFO: no later prompt overtakes one that waits for room
            chosen.append(Scheduled(seq, granted))
            held.add(id(seq))
            budget -= granted
        return chosen

    def _start(self, seq: Sequence) -> None:
        """Match a waiting sequence's tokens against the prefix cache (once: it keeps the hits)."""
        if seq.blocks or seq.params.prompt_logprobs:  # those need logits for every prompt token
            return
        seq.blocks, seq.block_keys = self.blocks.match_prefix(seq.known_ids())
        seq.num_cached = len(seq.blocks) * self.blocks.block_size
        if not seq.generated:
            seq.cached_prompt_tokens = seq.num_cached

    def _prefill(self, seq: Sequence, budget: int, held: set[int]) -> int:
        """Prompt tokens ``seq`` computes this step (0: none, it waits); takes their blocks. A prompt
        that needs log-probabilities goes whole, as the step's first prompt, whatever the budget."""
        whole = seq.params.prompt_logprobs and seq.num_cached == 0
        if whole and budget < self.prefill_tokens and seq.uncomputed() > budget:
            return 0
        want = seq.uncomputed() if whole else min(seq.uncomputed(), budget)
        if seq in self.waiting:  # starting: free blocks only, never preempting a running sequence
            room = (len(seq.blocks) + self.blocks.num_free()) * self.blocks.block_size - seq.num_cached
            granted = want if room >= want else (0 if whole else room)
            if granted <= 0 or not self._take(seq, granted):
                self.blocks.release(seq.blocks)  # the prefix hits go back until it gets room
                seq.blocks, seq.block_keys, seq.num_cached = [], [], 0
                return 0
            self.waiting.remove(seq)
            self.running.append(seq)
            if not seq.generated:  # a new prompt, not a recompute: count its prefix lookup once
                self.blocks.record_lookup(len(seq.token_ids), seq.cached_prompt_tokens)
            return granted
        if self._room(seq) < (want if whole else 1) and not self._grow(seq, want if whole else 1, held):
            return 0
        granted = want if whole else min(want, self._room(seq))
        return granted if self._take(seq, granted) else 0

    def _room(self, seq: Sequence) -> int:
        """Tokens ``seq`` could add with its own blocks plus the free ones."""
        held = len(seq.blocks) * self.blocks.block_size - seq.num_cached
        return held + self.blocks.num_free() * self.blocks.block_size

    def _take(self, seq: Sequence, tokens: int) -> bool:
        """Allocate the blocks ``seq`` needs to cache ``tokens`` more; False if they are not free."""
        need = self.blocks.blocks_for(seq.num_cached + tokens) - len(seq.blocks)
        if need <= 0:
            return True
        fresh = self.blocks.allocate(need)
        if fresh is None:
            return False
        seq.blocks.extend(fresh)
        return True

    def _grow(self, seq: Sequence, tokens: int, held: set[int]) -> bool:
        """Room for ``tokens`` more of a running ``seq``, preempting the latest started sequences not
        already in this step (``held``) if needed; False when that is not enough (``seq`` itself is
        then preempted if it was the latest)."""
        need = self.blocks.blocks_for(seq.num_cached + tokens) - len(seq.blocks)
        while need > self.blocks.num_free():
            victim = next((s for s in reversed(self.running) if id(s) not in held), None)
            if victim is None:
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return self._take(seq, tokens)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the front to recompute everything."""
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_keys, seq.num_cached = [], [], 0
        seq.preemptions += 1
        self.preemptions += 1
        log.info(
            "KV cache full: preempted completion %d of request %s (%d tokens); it recomputes them when "
            "blocks free up",
            seq.index,
            seq.request_id,
            len(seq.token_ids),
        )
        self.waiting.appendleft(seq)

    def computed(self, item: Scheduled) -> None:
        """Once the forward is queued: count the tokens as cached and seal the blocks they filled."""
        item.seq.num_cached += item.num_tokens
        self.seal(item.seq)

    def seal(self, seq: Sequence) -> None:
        """Give the full cached blocks of ``seq`` their prefix-cache keys, up to the first block holding
        a token not read yet (sealed when it is: ``seal`` again then)."""
        size = self.blocks.block_size
        for index in range(len(seq.block_keys), seq.num_cached // size):
            tokens = seq.token_ids[index * size : (index + 1) * size]
            if PENDING in tokens:
                break
            parent = seq.block_keys[-1] if seq.block_keys else ROOT_HASH
            seq.block_keys.append(self.blocks.seal(seq.blocks[index], parent, tokens))

    def finish(self, seq: Sequence) -> None:
        """A sequence ended (done, cancelled or failed): its blocks go back (sealed ones stay cached)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
