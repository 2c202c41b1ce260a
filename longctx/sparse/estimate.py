"""Online vertical-slash index estimation (MInference), per prefill segment and DCA part.

The last `last_q` queries of a segment score every key of the sequence; each head keeps its
top `vertical` key columns (by column sums of the softmax) and top `slash` diagonals (by sums
along lines of constant query-key distance), plus the first SINK_COLUMNS columns and the
LOCAL_DIAGONALS nearest diagonals of every part, always.

Parts (DESIGN.md section 3). A segment's queries lie in one DCA chunk n (c = chunk_len,
C = chunk_size); its keys split into intra [nc, q_end) causal, successive [(n-1)c, nc) and
inter [0, (n-1)c). The attention rotates queries at DCA positions; index selection instead
uses continuous positions (the Qwen2.5-1M fix), so that a fixed relative offset is a straight
line in every part:

    part         keys            selection query pos   key pos   selection distance
    intra        [nc, q_end)     p - nc                j - nc    p - j
    successive   [(n-1)c, nc)    p - nc + c            j mod c   p - j
    inter        [0, (n-1)c)     p - nc + C            j mod c   (p mod c) + C - (j mod c)

Inter keys are folded mod c before the diagonal sums, so one selected inter diagonal is a
line in every older chunk: absolute distance = selection distance - C + k c, k = 2..n.
Without DCA there is one part, intra, with c = infinity.

Softmax in float32 over the union of a row's keys in all parts (the scores of each part
computed with that part's selection query); memory is bounded by processing a few q heads at
a time. GQA: every q head gets its own pattern.

Budgets with DCA. Shared (the default, as in the Qwen2.5-1M release's vLLM backend): a head's
budget is spent once over all its parts, so a row visits about as many keys as without DCA.
Columns compete across every key of the sequence (sinks: its first SINK_COLUMNS). Intra and
successive distances are both continuous p - j, so a distance is one line for every row
(intra for rows far enough into the chunk, successive before): their scores add up, and a
chosen distance goes to both parts, the LOCAL_DIAGONALS nearest always. A folded inter
distance is a line in each of the m older chunks: it competes by score per line and costs m
lines of the budget (greedy by score / cost until the next pick would pass the budget).
Per part (`shared_budget=False`): every part gets the whole budget and its own forced sinks and
local diagonals (up to P times the keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longctx.config import DCAConfig
from longctx.ops.dca import INTER, INTRA, SUCCESSIVE, DCASegment

Tensor = torch.Tensor

SINK_COLUMNS = 30  # first keys of every part, always kept
LOCAL_DIAGONALS = 100  # nearest diagonals of every part, always kept
NO_COLUMN = -1  # padding in vertical index lists
NO_SLASH = -(2**40)  # padding in slash (distance) lists: sorts after every real distance
SCORE_ELEMENTS = 2**27  # float32 score elements materialised at once (512 MiB, a few live)


@dataclass(frozen=True)
class SparsePart:
    """Keys [key_lo, key_hi) that a query segment attends to with one query rotation.

    variant: which rotation of the query (INTRA / SUCCESSIVE / INTER, longctx.ops.dca).
    causal: a query at p sees keys <= p (intra); otherwise the whole range.
    q_shift: selection query position = p - key_lo + q_shift (0 but for inter: C - nc).
    fold: > 0 for inter: keys are folded mod fold (= c) for slash scores.
    """

    key_lo: int
    key_hi: int
    causal: bool
    variant: int = INTRA
    q_shift: int = 0
    fold: int = 0

    @property
    def num_keys(self) -> int:
        return self.key_hi - self.key_lo

    @property
    def diagonal_width(self) -> int:
        """Key axis length of the slash scores: keys, or one folded chunk."""
        return self.fold if self.fold else self.num_keys

    def shifts(self) -> tuple[int, ...]:
        """Absolute distance (p - j) = selection distance + shift, for each shift."""
        if not self.fold:
            return (-self.q_shift,)
        return tuple(-self.q_shift - m * self.fold for m in range(self.num_keys // self.fold))

    def selection_positions(self, positions: Tensor) -> Tensor:
        """RoPE positions of the selection queries at absolute positions [R]."""
        return positions - self.key_lo + self.q_shift


def segment_parts(seg: DCASegment, dca: DCAConfig | None) -> list[SparsePart]:
    """The non-empty parts of one segment (intra always exists). dca None: one causal part
    over every key (a segment spanning chunk 0 with chunk_len past the sequence)."""
    if dca is None:
        return [SparsePart(0, seg.q_end, causal=True)]
    c, big_c = dca.chunk_len, dca.chunk_size
    parts = [SparsePart(*seg.intra, causal=True, variant=INTRA)]
    if seg.successive[1] > seg.successive[0]:
        parts.append(SparsePart(*seg.successive, causal=False, variant=SUCCESSIVE))
    if seg.inter[1] > seg.inter[0]:
        shift = big_c - seg.chunk * c
        parts.append(SparsePart(*seg.inter, causal=False, variant=INTER, q_shift=shift, fold=c))
    return parts


@dataclass(frozen=True)
class PartSelection:
    """One part's chosen indices, per q head.

    vertical [Hq, kv] int64 absolute key positions (NO_COLUMN unused);
    slash [Hq, ks] int64 selection distances (NO_SLASH unused).
    """

    vertical: Tensor
    slash: Tensor


def estimate_indices(
    q_sel: Tensor,
    keys: Tensor,
    parts: Sequence[SparsePart],
    est_pos0: int,
    vertical_sizes: Sequence[int],
    slash_sizes: Sequence[int],
    *,
    scale: float,
    shared_budget: bool = True,
    kernel: bool = False,
    max_elements: int = SCORE_ELEMENTS,
) -> list[PartSelection]:
    """q_sel [P, R, Hq, D]: the R estimation queries (absolute positions est_pos0 + i, the
    last rows of their segment) rotated at each part's selection positions (YaRN factor
    included); keys [L, Hkv, D] rotated as cached (position = row). Budgets per q head, spent
    once over all parts or per part (module doc). kernel: the scores from the Triton passes
    (longctx/ops/triton/sparse_estimate.py, the CUDA path), else from part_scores."""
    if kernel:
        from longctx.ops.triton.sparse_estimate import part_scores_triton

        vert, slash = part_scores_triton(
            q_sel, keys, parts, est_pos0, scale=scale, max_elements=max_elements
        )
    else:
        vert, slash = part_scores(
            q_sel, keys, parts, est_pos0, scale=scale, max_elements=max_elements
        )
    if shared_budget and len(parts) > 1:
        return shared_selection(vert, slash, parts, est_pos0, q_sel.shape[1], vertical_sizes,
                                slash_sizes)  # fmt: skip
    return [
        PartSelection(
            top_vertical(v, p, vertical_sizes),
            top_slash(s, p, est_pos0, q_sel.shape[1], slash_sizes),
        )
        for v, s, p in zip(vert, slash, parts, strict=True)
    ]


def part_scores(
    q_sel: Tensor,
    keys: Tensor,
    parts: Sequence[SparsePart],
    est_pos0: int,
    *,
    scale: float,
    max_elements: int = SCORE_ELEMENTS,
) -> tuple[list[Tensor], list[Tensor]]:
    """Vertical scores [Hq, keys of part] and slash scores [Hq, R + width - 1] per part.

    Slash index u is selection distance base - width + 1 + u, base = est_pos0 - key_lo +
    q_shift (see `DiagonalSums`).

    The [g, R, keys] score tensors are what costs (memory bound: the matmul itself is tiny), so
    each element makes few passes: logits stay in the query dtype until one fused
    scale-and-shift writes them as float32 straight into the diagonal buffer, where they are
    exponentiated, normalised and summed in place (about half the traffic of logsumexp,
    exp(s - lse), a probability copy and a flipped copy).
    """
    _, rows, hq, _ = q_sel.shape
    groups = hq // keys.shape[1]
    total = sum(p.num_keys for p in parts)
    step = max(1, min(groups, max_elements // max(1, rows * total)))
    vert = [q_sel.new_zeros((hq, p.num_keys), dtype=torch.float32) for p in parts]
    slash = [q_sel.new_zeros((hq, rows + p.diagonal_width - 1), dtype=torch.float32) for p in parts]
    h0 = 0
    while h0 < hq:
        h1 = min(h0 + step, (h0 // groups + 1) * groups)  # one kv head per pass
        kv = keys[:, h0 // groups]
        logits = [_logits(q_sel[i, :, h0:h1], kv, p, est_pos0) for i, p in enumerate(parts)]
        # The softmax runs over the union of the parts: one row maximum across them all.
        row_max = torch.stack([s.amax(-1) for s in logits]).amax(0).float()  # [g, R]
        shift = (row_max * -scale)[..., None]
        exps: list[tuple[Tensor, DiagonalSums | None]] = []
        row_sum = torch.zeros_like(row_max)
        for i, p in enumerate(parts):
            s, logits[i] = logits[i], None  # free each part's logits once it is exponentiated
            diag = None if p.fold else DiagonalSums(h1 - h0, rows, p.num_keys, s.device)
            e = diag.centre if diag is not None else s.new_empty(s.shape, dtype=torch.float32)
            torch.add(shift, s, alpha=scale, out=e).exp_()  # exp(scale * (s - max)), <= 1
            row_sum += e.sum(-1)
            exps.append((e, diag))
        inv = row_sum.reciprocal()[..., None]
        for i, (p, (e, diag)) in enumerate(zip(parts, exps, strict=True)):
            e.mul_(inv)  # probabilities
            vert[i][h0:h1] = e.sum(1)
            if diag is None:  # inter: fold the keys mod c before the diagonal sums
                diag = DiagonalSums(h1 - h0, rows, p.fold, e.device)
                torch.sum(e.unflatten(-1, (-1, p.fold)), dim=2, out=diag.centre)
            slash[i][h0:h1] = diag.sums()
        h0 = h1
    return vert, slash


def _logits(q: Tensor, keys: Tensor, part: SparsePart, est_pos0: int) -> Tensor:
    """q [R, g, D], keys [L, D] -> unscaled logits [g, R, part keys] in q's dtype, causal mask
    applied (-inf)."""
    k = keys[part.key_lo : part.key_hi]
    s = torch.einsum("rgd,ld->grl", q, k)
    if part.causal:
        # Only the last R keys can lie after an estimation row (the rows end the segment).
        rows = q.shape[0]
        first = est_pos0 - part.key_lo  # column of row 0's own key
        cols = torch.arange(max(0, first), part.num_keys, device=q.device)
        later = cols[None, :] > first + torch.arange(rows, device=q.device)[:, None]
        s[..., max(0, first) :].masked_fill_(later, float("-inf"))
    return s


class DiagonalSums:
    """Sums of [g, R, T] values along diagonals: entry u of `sums()` [g, R + T - 1] sums
    centre[., i, t] over i - t = u - T + 1.

    The values go into `centre`, a view of a float32 buffer [g, R, T + 2R - 2] that has R - 1
    zero columns on either side. Reading the buffer with row stride T + 2R - 1 shifts row i
    left by i, so every diagonal lines up in one column (never reading past the row's own
    padding); summing the rows gives the diagonals, last one first. Only the padding is
    zeroed: the caller writes the centre in place.
    """

    def __init__(self, groups: int, rows: int, width: int, device: torch.device) -> None:
        self.width = width
        pad = rows - 1
        shape = (groups, rows, width + 2 * pad)
        self.buffer = torch.empty(shape, dtype=torch.float32, device=device)
        self.buffer[..., :pad].zero_()
        self.buffer[..., pad + width :].zero_()
        self.centre = self.buffer[..., pad : pad + width]

    def sums(self) -> Tensor:
        g, rows, row_len = self.buffer.shape
        view = self.buffer.as_strided(
            (g, rows, self.width + rows - 1),
            (rows * row_len, row_len + 1, 1),
            self.buffer.storage_offset(),
        )
        return view.sum(1).flip(-1)


def shared_selection(
    vert: Sequence[Tensor],
    slash: Sequence[Tensor],
    parts: Sequence[SparsePart],
    est_pos0: int,
    rows: int,
    vertical_sizes: Sequence[int],
    slash_sizes: Sequence[int],
) -> list[PartSelection]:
    """One budget per head over all parts (module doc), from part_scores' output. The parts
    must tile the keys [0, q_end) (segment_parts does)."""
    by_key = sorted(range(len(parts)), key=lambda i: parts[i].key_lo)
    lo = parts[by_key[0]].key_lo
    every = torch.cat([vert[i] for i in by_key], dim=1)  # [Hq, keys], key = lo + index
    cols = lo + _top_per_head(_force_first(every, SINK_COLUMNS), vertical_sizes, NO_COLUMN - lo)
    verticals = [
        compact(torch.where((cols >= p.key_lo) & (cols < p.key_hi), cols, NO_COLUMN), NO_COLUMN)
        for p in parts
    ]

    # Candidates: continuous distances d_lo.. (intra + successive scores added), then inter's
    # folded distances.
    spans = [_slash_span(p, est_pos0, rows) for p in parts]  # (first, lowest valid, last)
    line = [i for i, p in enumerate(parts) if not p.fold]
    d_lo = min(spans[i][1] for i in line)
    d_hi = max(spans[i][2] for i in line)
    hq = slash[0].shape[0]
    dev = slash[0].device
    cont = torch.full((hq, d_hi - d_lo + 1), float("-inf"), device=dev)
    for i in line:
        first, lowest, last = spans[i]
        region = cont[:, lowest - d_lo : last - d_lo + 1]
        region.copy_(torch.where(region.isinf(), 0.0, region) + slash[i][:, lowest - first :])
    cont = _force_first(cont, LOCAL_DIAGONALS)
    fold = [i for i, p in enumerate(parts) if p.fold]
    density, cost = [cont], [torch.ones(cont.shape[1], device=dev)]
    for i in fold:
        lines = parts[i].num_keys // parts[i].fold
        density.append(slash[i] / lines)
        cost.append(torch.full((slash[i].shape[1],), float(lines), device=dev))
    picked = _greedy(torch.cat(density, 1), torch.cat(cost), slash_sizes)  # [Hq, k] or -1
    slashes = []
    n_cont = cont.shape[1]
    for i, p in enumerate(parts):
        if not p.fold:
            ok = (picked >= 0) & (picked < n_cont)
            slashes.append(torch.where(ok, picked + d_lo, NO_SLASH))
            continue
        start = n_cont + sum(density[1 + fold.index(j)].shape[1] for j in fold if j < i)
        ok = (picked >= start) & (picked < start + slash[i].shape[1])
        slashes.append(compact(torch.where(ok, picked - start + spans[i][0], NO_SLASH), NO_SLASH))
    return [PartSelection(v, s) for v, s in zip(verticals, slashes, strict=True)]


def compact(x: Tensor, pad: int) -> Tensor:
    """x [H, k] with the pad entries moved last and the columns that are pad in every row cut
    (a part's share of a shared budget is a fraction of it: conversion cost follows the width)."""
    real = x != pad
    k = int(real.sum(1).max()) if x.numel() else 0
    order = torch.sort(real.to(torch.int8), dim=1, descending=True, stable=True).indices
    return x.gather(1, order[:, :k])


def _slash_span(part: SparsePart, est_pos0: int, rows: int) -> tuple[int, int, int]:
    """Selection distances of a part's slash scores: (of index 0, lowest valid, of the last)."""
    width = part.diagonal_width
    first = est_pos0 - part.key_lo + part.q_shift - width + 1
    lowest = max(first, part.q_shift) if part.causal else first
    return first, lowest, first + rows + width - 2


def _greedy(density: Tensor, cost: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per head, candidates by falling density while their summed cost stays within the
    head's size; indices [H, k] into the candidates, -1 padding. -inf candidates never count."""
    order = torch.sort(density, dim=1, descending=True)
    spent = torch.cumsum(cost[order.indices], dim=1)
    size = torch.tensor(list(sizes), device=density.device, dtype=spent.dtype)
    keep = (spent <= size[:, None]) & (order.values > float("-inf"))
    k = int(keep.sum(1).max()) if keep.numel() else 0
    return torch.where(keep[:, :k], order.indices[:, :k], -1)


def top_vertical(scores: Tensor, part: SparsePart, sizes: Sequence[int]) -> Tensor:
    """Absolute key columns [Hq, k]: the first SINK_COLUMNS, then the highest scores."""
    scores = _force_first(scores, SINK_COLUMNS)
    return part.key_lo + _top_per_head(scores, sizes, NO_COLUMN - part.key_lo)


def top_slash(
    scores: Tensor, part: SparsePart, est_pos0: int, rows: int, sizes: Sequence[int]
) -> Tensor:
    """Selection distances [Hq, k]: the LOCAL_DIAGONALS smallest reachable, then the best."""
    width = part.diagonal_width
    first = est_pos0 - part.key_lo + part.q_shift - width + 1  # distance of index 0
    lowest = max(first, part.q_shift) if part.causal else first  # causal: p - j >= 0
    valid = _force_first(scores[:, lowest - first :], LOCAL_DIAGONALS)
    return lowest + _top_per_head(valid, sizes, NO_SLASH - lowest)


def _force_first(scores: Tensor, count: int) -> Tensor:
    """Rank the first `count` entries above every score (each score is a sum of at most R
    probabilities, so R + 1 beats it), earlier entries first."""
    out = scores.clone()
    count = min(count, out.shape[1])
    top = float(out.max()) + 1.0 if out.numel() else 1.0
    out[:, :count] = top + torch.arange(count, 0, -1, device=out.device, dtype=out.dtype)
    return out


def _top_per_head(scores: Tensor, sizes: Sequence[int], pad: int) -> Tensor:
    """Indices [H, max k] of each row's top sizes[h] scores; the rest of the row is `pad`."""
    k = min(max(sizes, default=0), scores.shape[1])
    idx = torch.topk(scores, k, dim=1).indices
    size = torch.tensor(list(sizes), device=scores.device)
    keep = torch.arange(k, device=scores.device)[None, :] < size[:, None]
    return torch.where(keep, idx, torch.full_like(idx, pad))
