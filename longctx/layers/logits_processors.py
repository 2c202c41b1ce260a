"""What changes a sequence's logits before sampling: logit_bias, then the penalties (vLLM's).

The penalties need to know which tokens a sequence has seen. That lives on the logits' device
(`SequenceLogitsState`): built from the host's token lists at the sequence's first sample and
counted forward on the device after each sample, so that with asynchronous scheduling the
token still in flight counts without the host waiting for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longctx.sampling_params import SamplingParams


@dataclass
class SequenceLogitsState:
    """Per sequence, on the logits' device. prompt_mask / output_counts only with penalties,
    bias_ids / bias_values only with logit_bias."""

    prompt_mask: torch.Tensor | None  # [V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None  # [V] float32: times the token was generated
    bias_ids: torch.Tensor | None  # [B] int64
    bias_values: torch.Tensor | None  # [B] float32

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        return params.has_penalties or bool(params.logit_bias)

    @classmethod
    def build(
        cls,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
    ) -> SequenceLogitsState:
        mask = counts = ids = values = None
        if params.has_penalties:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            mask[torch.tensor(list(prompt_ids), dtype=torch.int64, device=device)] = True
            counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            out = torch.tensor(list(output_ids), dtype=torch.int64, device=device)
            counts.index_add_(0, out, torch.ones(len(out), device=device))
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.int64, device=device)
            values = torch.tensor(list(params.logit_bias.values()), device=device)
        return cls(mask, counts, ids, values)

    def record(self, token: torch.Tensor) -> None:
        """Count a sampled token (a 1-element device tensor) without reading it."""
        if self.output_counts is not None:
            self.output_counts.index_add_(0, token, torch.ones(1, device=token.device))


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    states: Sequence[SequenceLogitsState | None],
) -> torch.Tensor:
    """logits [R, V] with each row's logit_bias and penalties applied (a new tensor if any
    row has them; logits itself is left unchanged)."""
    rows = [r for r, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    out = logits.clone()
    for r in rows:
        if states[r].bias_ids is not None:
            out[r].index_add_(0, states[r].bias_ids, states[r].bias_values)
    penalized = [r for r in rows if params[r].has_penalties]
    if penalized:
        idx = torch.tensor(penalized, device=logits.device)
        out[idx] = apply_penalties(
            out[idx],
            [params[r] for r in penalized],
            torch.stack([states[r].prompt_mask for r in penalized]),
            torch.stack([states[r].output_counts for r in penalized]),
        )
    return out


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties on logits [P, V]: repetition (prompt and output), then frequency and
    presence (output only)."""

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]

    rep = column([p.repetition_penalty for p in params])
    seen = prompt_mask | (output_counts > 0)
    scale = torch.where(logits > 0, 1.0 / rep, rep)
    logits = torch.where(seen, logits * scale, logits)
    logits = logits - column([p.frequency_penalty for p in params]) * output_counts
    return logits - column([p.presence_penalty for p in params]) * (output_counts > 0)
