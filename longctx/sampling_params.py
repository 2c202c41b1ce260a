from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from longctx.errors import SamplingParamsError
from longctx.structured_output import StructuredOutput

MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty|: OpenAI's range
MAX_LOGIT_BIAS = 100.0
# Beyond this range the penalty overflows float32 logits (1 / 5e-324 is inf) and sampling fails.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, as vLLM's SamplingParams.

    temperature 0 is greedy. logprobs=N returns, for every generated token, the top-N
    log-probabilities of the model's distribution (before temperature / top-k / top-p) plus the
    chosen token's. prompt_logprobs=N does the same for every prompt token after the first.
    Stop strings are cut from the returned text.

    Penalties follow vLLM: repetition_penalty divides the positive logits (multiplies the
    negative ones) of every token seen in the prompt or the output; frequency_penalty subtracts
    penalty x count of each token in the output, presence_penalty subtracts the penalty once
    for each token the output holds. logit_bias adds a value to a token's logit (before the
    penalties). seed gives the request its own random stream, so its samples do not depend on
    what else runs in the batch. structured_output constrains the text to a JSON Schema, any
    JSON object or a grammar (see longctx.structured_output). n: samples per prompt, which
    share the prompt's prefill (choice i seeded with seed + i, as vLLM does).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    structured_output: StructuredOutput | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _bias_dict(self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        rep_lo, rep_hi = REPETITION_PENALTY_RANGE
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (
                self.logprobs is None or self.logprobs >= 0,
                f"logprobs must be >= 0, got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (
                abs(self.presence_penalty) <= MAX_PENALTY,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                abs(self.frequency_penalty) <= MAX_PENALTY,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                rep_lo <= self.repetition_penalty <= rep_hi,
                f"repetition_penalty must be in [{rep_lo}, {rep_hi}] (1 = off), "
                f"got {self.repetition_penalty}",
            ),
            (
                all(abs(b) <= MAX_LOGIT_BIAS for b in (self.logit_bias or {}).values()),
                "logit_bias values must be in [-100, 100]",
            ),
            (
                self.structured_output is None
                or isinstance(self.structured_output, StructuredOutput),
                "structured_output must be a longctx.structured_output.StructuredOutput",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_choice(self, i: int) -> SamplingParams:
        """The params of the i-th of n samples: one sequence, its own seed."""
        seed = None if self.seed is None else self.seed + i
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


def _bias_dict(bias: Mapping[int, float]) -> dict[int, float]:
    try:
        out = {int(t): float(b) for t, b in bias.items()}
    except (TypeError, ValueError, AttributeError):
        raise SamplingParamsError("logit_bias must map token ids to numbers") from None
    if any(t < 0 for t in out):
        raise SamplingParamsError("logit_bias token ids must be >= 0")
    return out
