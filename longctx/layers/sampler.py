"""Token selection from float32 logits, one row per sequence that samples this step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.layers.logits_processors import SequenceLogitsState, process_logits
from longctx.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None
    state: SequenceLogitsState | None = None  # needed for logit_bias and penalties


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
    # Shifted to a maximum of 0 first, and the temperature kept representable: a tiny one then
    # sends the others to -inf instead of the maximum to +inf (softmax of inf is NaN).
    temperature = max(params.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.max()) / temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop[0] = False  # also when top_p underflows float32 to 0 (5e-324 does)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p / sorted_p.sum())
    return probs


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> DeviceSample:
    """logits [R, V] float32 -> one token per row, left on the logits' device.

    logit_bias and penalties shape the choice; logprobs are those of the logits as given.
    Nothing here waits for the device, so the engine can schedule the next step while this one
    runs; `DeviceSample.to_host()` starts the copy back and `result()` waits for it.
    """
    processed = process_logits(logits, [q.params for q in requests], [q.state for q in requests])
    chosen = processed.argmax(dim=-1)
    for r, req in enumerate(requests):
        if not req.params.greedy:
            probs = _filtered_probs(processed[r], req.params)
            chosen[r] = torch.multinomial(probs, 1, generator=req.generator)[0]
        if req.state is not None:
            req.state.record(chosen[r : r + 1])
    want = tuple(req.params.logprobs for req in requests)
    rows = [r for r, n in enumerate(want) if n is not None]
    top = None
    if rows:
        logprobs = torch.log_softmax(logits[rows], dim=-1)
        width = max(want[r] for r in rows)
        picked = chosen[rows]
        vals, idx = logprobs.topk(width, dim=-1) if width > 0 else (None, None)
        top = (tuple(rows), vals, idx, logprobs.gather(1, picked[:, None])[:, 0])
    return DeviceSample(chosen, want, top)


@dataclass
class DeviceSample:
    """Sampled tokens (and top logprobs) still on the device; see `sample`."""

    token_ids: torch.Tensor  # [R] int64
    want: tuple[int | None, ...]
    # (rows that asked for logprobs, top values [r, N] | None, their ids, chosen logprob [r])
    top: tuple[tuple[int, ...], torch.Tensor | None, torch.Tensor | None, torch.Tensor] | None
    _event: torch.cuda.Event | None = None

    def to_host(self) -> DeviceSample:
        """Start copying to (pinned) host memory without waiting; `result()` waits."""
        if self.token_ids.device.type != "cuda":
            return self

        def pinned(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        top = None
        if self.top is not None:
            rows, vals, idx, chosen_lp = self.top
            top = (rows, pinned(vals), pinned(idx), pinned(chosen_lp))
        event = torch.cuda.Event()
        out = DeviceSample(pinned(self.token_ids), self.want, top, event)
        event.record()
        return out

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        tokens = self.token_ids.tolist()
        lps: list[dict[int, float] | None] = [None] * len(tokens)
        if self.top is not None:
            rows, vals, idx, chosen_lp = self.top
            for j, r in enumerate(rows):
                entry = {}
                if vals is not None:
                    best = zip(idx[j, : self.want[r]].tolist(), vals[j, : self.want[r]].tolist())
                    entry = dict(best)
                entry[tokens[r]] = float(chosen_lp[j])
                lps[r] = entry
        return SampleResult(token_ids=tokens, logprobs=lps)
