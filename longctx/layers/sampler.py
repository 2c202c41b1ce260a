"""Token selection from float32 logits, one row per sequence that samples this step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    # Per row: {token_id: logprob} of the top-N tokens plus the chosen one (None if not asked).
    logprobs: list[dict[int, float] | None]


def top_logprobs(logprobs: torch.Tensor, n: int, chosen: torch.Tensor) -> list[dict[int, float]]:
    """Top-n entries of each row of logprobs [R, V] plus the chosen token of the row."""
    out: list[dict[int, float]] = []
    vals, idx = logprobs.topk(n, dim=-1) if n > 0 else (None, None)
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    for r, tok in enumerate(chosen.tolist()):
        row = dict(zip(idx[r].tolist(), vals[r].tolist())) if n > 0 else {}
        row[tok] = chosen_lp[r]
        out.append(row)
    return out


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p / sorted_p.sum())
    return probs


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> SampleResult:
    """logits [R, V] float32 -> one token per row."""
    chosen = logits.argmax(dim=-1)
    for r, req in enumerate(requests):
        if not req.params.greedy:
            probs = _filtered_probs(logits[r], req.params)
            chosen[r] = torch.multinomial(probs, 1, generator=req.generator)[0]
    want = [req.params.logprobs for req in requests]
    lps: list[dict[int, float] | None] = [None] * len(requests)
    if any(n is not None for n in want):
        rows = [r for r, n in enumerate(want) if n is not None]
        logprobs = torch.log_softmax(logits[rows], dim=-1)
        width = max(want[r] for r in rows)
        tops = top_logprobs(logprobs, width, chosen[rows])
        for r, top in zip(rows, tops):
            lps[r] = _trim(top, want[r], int(chosen[r]))
    return SampleResult(token_ids=chosen.tolist(), logprobs=lps)


def _trim(top: dict[int, float], n: int, chosen: int) -> dict[int, float]:
    """Keep the n best entries and the chosen token (rows share one top-k width)."""
    best = sorted(top.items(), key=lambda kv: -kv[1])[:n]
    kept = dict(best)
    kept[chosen] = top[chosen]
    return kept
