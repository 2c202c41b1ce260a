"""Continuous batching with chunked prefill under one token budget.

Each step takes, in order: the running sequences (a decode token each, or the next chunk of an
unfinished prefill), then waiting sequences while the token budget, the sequence limit and free
KV blocks allow. A prompt longer than the budget is prefilled over several steps, each chunk
attending to the cache its earlier chunks wrote. When blocks run out, the most recently admitted
running sequence is preempted: its blocks are freed and it is recomputed later.

With prefix caching a waiting sequence is admitted after its cached prefix (those tokens cost
no budget), and one whose next block a running sequence is computing waits for it to share.
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
        self.num_preemptions = 0  # since start, for metrics

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_room(self) -> bool:
        return len(self.running) < self.max_num_seqs

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence whose blocks are already in place (a fork of another's prompt)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        for seq in self.running:  # the previous step, which computed their blocks, is queued
            self.blocks.commit(seq)
        chosen: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0 or seq not in self.running:
                continue
            if seq.num_pending and seq.will_stop_on_length:
                continue  # its last token is in flight: nothing more to compute
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            if n > 0 and self._reserve(seq, n):
                chosen.append((seq, n))
                budget -= n
        in_progress = self.blocks.in_progress(self.running) if self.waiting else set()
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            hit = self.blocks.prefix_hit(seq)
            if self.blocks.waits_for(seq, hit, in_progress):
                i += 1  # admitted once a running sequence has computed its next blocks
                continue
            start = len(hit) * self.blocks.block_size
            n = self._chunk(seq, start, budget)
            if n <= 0 or not self.blocks.can_admit(hit, start + n):
                break
            self.blocks.admit(seq, hit)
            self.blocks.grow(seq.block_table, start + n)
            in_progress |= self.blocks.in_progress((seq,))
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
        if not chosen:
            return None
        seqs, counts = zip(*chosen)
        return ScheduledBatch(seqs=seqs, num_new_tokens=counts)

    def _chunk(self, seq: Sequence, start: int, budget: int) -> int:
        """Tokens of seq to compute this step from token `start` on (its cached prefix ends
        there); 0: none. A subclass may shape or hold them."""
        return min(seq.num_tokens - start, budget)

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
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.release_seq(seq, keep=True)  # its recomputation may hit its own blocks
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and return its blocks at once (also for aborts)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release_seq(seq, keep=reason != "abort")
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
