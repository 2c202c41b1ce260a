"""Continuous batching with chunked prefill under one token budget.

Each step takes, in order: the running sequences (a decode token each, or the next chunk of an
unfinished prefill), then waiting sequences while the token budget, the sequence limit and free
KV blocks allow. A prompt longer than the budget is prefilled over several steps, each chunk
attending to the cache its earlier chunks wrote. When blocks run out, the most recently admitted
running sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from longctx.engine.kv_cache import BlockManager
from longctx.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: tuple[Sequence, ...]
    num_new_tokens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step (and so picks a new one)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0 or seq not in self.running:
                continue
            if seq.num_pending and seq.will_stop_on_length:
                continue  # its last token is in flight: nothing more to compute
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._reserve(seq, n):
                chosen.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + n):
                break
            self.blocks.grow(seq.block_table, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
        if not chosen:
            return None
        seqs, counts = zip(*chosen)
        return ScheduledBatch(seqs=seqs, num_new_tokens=counts)

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Grow seq's table for n more tokens, preempting later-admitted sequences if needed."""
        target = seq.num_computed_tokens + n
        while not self.blocks.can_grow(seq.block_table, target):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and return its blocks at once (also for aborts)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
