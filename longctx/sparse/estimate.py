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
    max_elements: int = SCORE_ELEMENTS,
) -> list[PartSelection]:
    """q_sel [P, R, Hq, D]: the R estimation queries (absolute positions est_pos0 + i, the
    last rows of their segment) rotated at each part's selection positions (YaRN factor
    included); keys [L, Hkv, D] rotated as cached (position = row). Budgets per q head."""
    vert, slash = part_scores(q_sel, keys, parts, est_pos0, scale=scale, max_elements=max_elements)
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
    q_shift (see `diagonal_sums`).
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
        scores = [
            _scores(q_sel[i, :, h0:h1], keys[:, h0 // groups], p, est_pos0, scale)
            for i, p in enumerate(parts)
        ]
        lse = torch.logsumexp(torch.stack([s.logsumexp(-1) for s in scores]), dim=0)  # [g, R]
        for i, (s, p) in enumerate(zip(scores, parts)):
            probs = torch.exp(s - lse[..., None])  # [g, R, keys]
            vert[i][h0:h1] = probs.sum(1)
            if p.fold:
                probs = probs.unflatten(-1, (-1, p.fold)).sum(-2)
            slash[i][h0:h1] = diagonal_sums(probs)
        h0 = h1
    return vert, slash


def _scores(q: Tensor, keys: Tensor, part: SparsePart, est_pos0: int, scale: float) -> Tensor:
    """q [R, g, D], keys [L, D] -> float32 logits [g, R, part keys], causal mask applied."""
    k = keys[part.key_lo : part.key_hi]
    s = torch.einsum("rgd,ld->grl", q, k).float() * scale
    if part.causal:
        # Only the last R keys can lie after an estimation row (the rows end the segment).
        rows = q.shape[0]
        first = est_pos0 - part.key_lo  # column of row 0's own key
        cols = torch.arange(max(0, first), part.num_keys, device=q.device)
        later = cols[None, :] > first + torch.arange(rows, device=q.device)[:, None]
        s[..., max(0, first) :].masked_fill_(later, float("-inf"))
    return s


def diagonal_sums(probs: Tensor) -> Tensor:
    """probs [g, R, T] -> [g, R + T - 1]: entry u sums probs[., i, t] over i - t = u - T + 1.

    Reversing the key axis makes each diagonal an anti-diagonal; in a buffer padded to row
    length T + R, reading rows with stride T + R - 1 lines every anti-diagonal up in one column
    (the wrapped reads land in the zero padding).
    """
    g, rows, width = probs.shape
    buf = probs.new_zeros((g, rows, width + rows))
    buf[..., :width] = probs.flip(-1)
    view = buf.as_strided((g, rows, width + rows - 1), (rows * (width + rows), width + rows - 1, 1))
    return view.sum(1)


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
