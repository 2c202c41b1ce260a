from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from longctx.layers.logits_processors import SequenceLogitsState
from longctx.sampling_params import SamplingParams
from longctx.structured_output import GrammarMatcher
from longctx.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's state. Scheduling is catch-up: num_computed_tokens runs to num_tokens.

    With asynchronous scheduling a sampled token reaches the host a step after the device made
    it: num_pending counts those tokens (0, 1, or 2 for a moment), which already count in
    num_tokens so the next step can be scheduled; pending_row is where the newest one sits in
    the in-flight step's device tensor of sampled tokens.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_model_len: int
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    text: str = ""
    streamed_chars: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    num_pending: int = 0
    pending_row: int = -1
    logits_state: SequenceLogitsState | None = None  # the sampler's, built at the first sample
    grammar: GrammarMatcher | None = None  # with params.structured_output
    # Prefix caching (longctx/engine/kv_cache.py BlockManager): the hash chain of the full
    # blocks of token_ids, how many of block_table's blocks are named by it, and the tokens
    # found cached at first admission (None until admitted).
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0
    num_cached_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def will_stop_on_length(self) -> bool:
        """Whether the tokens known or in flight already reach max_tokens or max_model_len."""
        produced = self.num_tokens - self.num_prompt_tokens
        return produced >= self.params.max_tokens or self.num_tokens >= self.max_model_len

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this sequence can hold in the cache."""
        return min(self.num_prompt_tokens + self.params.max_tokens, self.max_model_len)
