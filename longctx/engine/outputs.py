from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step. `new_text` is what streaming clients have not seen yet
    (text that could still turn into a stop string is held back until it cannot)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    new_text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[dict[int, float] | None] | None
    finished: bool
    finish_reason: str | None
    num_computed_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
