"""n > 1 sampling without n prefills: sequences that share a leader's prompt wait until the
leader has computed it, then start from its KV blocks.

    leader   [ prompt .............................. | p ] -> samples its own tokens
    child         shares the full blocks -----------^  |
                  (refcounted), a copy of the partial  |
                  last block, and computes only the    +-- last prompt token: its logits
                  last prompt token itself                 give the child's first token

A child is held here (not in the scheduler) until the step that completes the leader's
prompt is queued; the block copy is queued after it on the same stream, so it reads written
KV. If the leader stops or is preempted before that, or no block is free, the child waits;
if the leader ends without sharing, the child runs as an ordinary request.
"""

from __future__ import annotations

from longctx.engine.kv_cache import copy_blocks
from longctx.engine.scheduler import Scheduler
from longctx.engine.sequence import Sequence, SequenceStatus
from longctx.layers.attention import KVCache


class PromptForks:
    def __init__(self) -> None:
        self._children: dict[str, list[Sequence]] = {}  # leader id -> children not yet started
        self._leaders: dict[str, Sequence] = {}

    def __bool__(self) -> bool:
        return bool(self._children)

    def hold(self, leader: Sequence, child: Sequence) -> None:
        # The child reads the leader's prompt logprobs: it computes none of its prompt.
        child.prompt_logprobs = leader.prompt_logprobs
        self._leaders[leader.request_id] = leader
        self._children.setdefault(leader.request_id, []).append(child)

    def drop(self, request_id: str) -> bool:
        """Forget a held child (aborted); whether it was held."""
        for children in self._children.values():
            for child in children:
                if child.request_id == request_id:
                    children.remove(child)
                    return True
        return False

    def start_ready(self, scheduler: Scheduler, caches: tuple[KVCache, ...]) -> None:
        """Start the children whose leader's prompt KV is queued (call after a launch)."""
        for rid in list(self._children):
            leader, children = self._leaders[rid], self._children[rid]
            if leader.is_finished:
                for child in children:  # too late to share: an ordinary request now
                    scheduler.add(child)
                children.clear()
            elif leader.status is SequenceStatus.RUNNING:
                self._start(leader, children, scheduler, caches)
            if not children:
                del self._children[rid], self._leaders[rid]

    @staticmethod
    def _start(
        leader: Sequence,
        children: list[Sequence],
        scheduler: Scheduler,
        caches: tuple[KVCache, ...],
    ) -> None:
        shared = leader.num_prompt_tokens - 1
        if leader.num_computed_tokens < shared:
            return
        blocks = scheduler.blocks
        while children and scheduler.has_room() and blocks.num_free >= 1:
            child = children.pop(0)
            table, copy = blocks.fork(leader.block_table, shared)
            if copy is not None:
                copy_blocks(caches, [copy])
            child.block_table = table
            child.num_computed_tokens = shared
            child.num_committed_blocks = shared // blocks.block_size
            child.num_cached_tokens = shared
            scheduler.add_running(child)
