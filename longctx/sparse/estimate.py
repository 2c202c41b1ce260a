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

Slash unit. The kernel (longctx/ops/triton/vs_sparse.py) computes whole BM x BN tiles: a query
block at m0 and a diagonal at distance o read keys [m0 - o, m0 - o + BN), so every row of the
block attends every key of that tile, and an isolated diagonal costs as much as BN adjacent
ones. `unit="diagonal"` is MInference's meaning of the budget (slash_size diagonals, however
spread: at 1M tokens a real model's weaker choices scatter, and the kernel ends up near dense).
`unit="tile"` (the engine's default) spends the budget in keys per row: ceil(slash / BN) tiles
per head, placed on the grid o = k BN (k >= 0; inter: selection distances k BN, one tile in each
of the m older chunks, so cost m). A tile's score is the estimated mass it would cover for a
block under the slash assumption (attention a function of distance): sum over d of
S(d) n(d - o), where S are the diagonal sums and n(delta) counts the (row, key) pairs of the tile
at row - key = delta (a triangle of width BM + BN - 1). The tiles covering the LOCAL_DIAGONALS
nearest diagonals of every row are always kept. Chosen grid points are handed to the
conversion as diagonals; neighbours (BN apart) merge into runs, so k chosen tiles cost k tiles.
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
SLASH_UNITS = ("tile", "diagonal")


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
    unit: str = "diagonal",
    blocks: tuple[int, int] = (64, 64),
) -> list[PartSelection]:
    """q_sel [P, R, Hq, D]: the R estimation queries (absolute positions est_pos0 + i, the
    last rows of their segment) rotated at each part's selection positions (YaRN factor
    included); keys [L, Hkv, D] rotated as cached (position = row). Budgets per q head, spent
    once over all parts or per part, in diagonals or in kernel tiles of `blocks` = (BM, BN)
    (module doc). kernel: the scores from the Triton passes (longctx/ops/triton/
    sparse_estimate.py, the CUDA path), else from part_scores. No host synchronisation on
    CUDA: every shape follows from the budgets and the segment."""
    scores = estimate_scores(
        q_sel, keys, parts, est_pos0, scale=scale, kernel=kernel, max_elements=max_elements
    )
    return select_indices(
        scores, parts, est_pos0, q_sel.shape[1], vertical_sizes, slash_sizes,
        shared_budget=shared_budget, unit=unit, blocks=blocks,
    )  # fmt: skip


def estimate_scores(
    q_sel: Tensor,
    keys: Tensor,
    parts: Sequence[SparsePart],
    est_pos0: int,
    *,
    scale: float,
    kernel: bool = False,
    max_elements: int = SCORE_ELEMENTS,
) -> tuple[list[Tensor], list[Tensor]]:
    """(vertical, slash) scores per part (part_scores' contract), from the Triton passes
    (kernel) or from part_scores."""
    if kernel:
        from longctx.ops.triton.sparse_estimate import part_scores_triton

        return part_scores_triton(
            q_sel, keys, parts, est_pos0, scale=scale, max_elements=max_elements
        )
    return part_scores(q_sel, keys, parts, est_pos0, scale=scale, max_elements=max_elements)


def select_indices(
    scores: tuple[Sequence[Tensor], Sequence[Tensor]],
    parts: Sequence[SparsePart],
    est_pos0: int,
    rows: int,
    vertical_sizes: Sequence[int],
    slash_sizes: Sequence[int],
    *,
    shared_budget: bool = True,
    unit: str = "diagonal",
    blocks: tuple[int, int] = (64, 64),
) -> list[PartSelection]:
    """Each head's columns and slashes from estimate_scores' output (estimate_indices)."""
    vert, slash = scores
    if unit == "tile":
        return tile_selection(
            vert, slash, parts, est_pos0, rows, vertical_sizes, slash_sizes,
            blocks=blocks, shared=shared_budget,
        )  # fmt: skip
    if unit != "diagonal":
        raise ValueError(f"slash unit must be one of {SLASH_UNITS}, got {unit!r}")
    if shared_budget and len(parts) > 1:
        return shared_selection(vert, slash, parts, est_pos0, rows, vertical_sizes,
                                slash_sizes)  # fmt: skip
    return [
        PartSelection(
            top_vertical(v, p, vertical_sizes, rows),
            top_slash(s, p, est_pos0, rows, slash_sizes),
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
    verticals = shared_columns(vert, parts, vertical_sizes, rows)
    # Candidates: continuous distances d_lo.. (intra + successive scores added), then inter's
    # folded distances.
    spans = [_slash_span(p, est_pos0, rows) for p in parts]  # (first, lowest valid, last)
    line = [i for i, p in enumerate(parts) if not p.fold]
    d_lo = min(spans[i][1] for i in line)
    cont = _line_scores(slash, parts, spans, d_lo, float("-inf"))
    dev = cont.device
    cont = _force_first(cont, LOCAL_DIAGONALS, _bound(rows))
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


def shared_columns(
    vert: Sequence[Tensor], parts: Sequence[SparsePart], sizes: Sequence[int], rows: int
) -> list[Tensor]:
    """One vertical budget per head over every key of the parts (which tile [lo, q_end)): the
    first SINK_COLUMNS keys, then the best column sums; each part gets its own columns."""
    by_key = sorted(range(len(parts)), key=lambda i: parts[i].key_lo)
    lo = parts[by_key[0]].key_lo
    every = torch.cat([vert[i] for i in by_key], dim=1)  # [Hq, keys], key = lo + index
    forced = _force_first(every, SINK_COLUMNS, _bound(rows))
    cols = lo + _top_per_head(forced, sizes, NO_COLUMN - lo)
    return [
        compact(torch.where((cols >= p.key_lo) & (cols < p.key_hi), cols, NO_COLUMN), NO_COLUMN)
        for p in parts
    ]


def _line_scores(
    slash: Sequence[Tensor],
    parts: Sequence[SparsePart],
    spans: Sequence[tuple[int, int, int]],
    d_lo: int,
    empty: float,
) -> Tensor:
    """[Hq, distances d_lo..] intra + successive slash scores added per continuous distance
    (a distance is one line for every row); `empty` where no part reaches."""
    line = [i for i, p in enumerate(parts) if not p.fold]
    d_hi = max(spans[i][2] for i in line)
    cont = torch.full((slash[0].shape[0], d_hi - d_lo + 1), empty, device=slash[0].device)
    for i in line:
        first, lowest, last = spans[i]
        region = cont[:, lowest - d_lo : last - d_lo + 1]
        region.copy_(torch.where(region.isinf(), 0.0, region) + slash[i][:, lowest - first :])
    return cont


def compact(x: Tensor, pad: int) -> Tensor:
    """x [H, k] with the pad entries moved last and the columns that are pad in every row cut
    (a part's share of a shared budget is a fraction of it: conversion cost follows the width).
    On CUDA x is returned as it is: cutting needs the width on the host (a synchronisation per
    segment and layer), and the conversion ignores padding wherever it sits."""
    if x.is_cuda:
        return x
    real = x != pad
    k = int(real.sum(1).max()) if x.numel() else 0
    order = torch.sort(real.to(torch.int8), dim=1, descending=True, stable=True).indices
    return x.gather(1, order[:, :k])


def host_tensor(values: list, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small host list on `device` without waiting for the device's queue: a plain
    torch.tensor(..., device=cuda) copies from pageable memory and synchronises the stream."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _bound(rows: int, block_m: int = 1, block_n: int = 1) -> float:
    """Above every score: a column or diagonal sums at most `rows` probabilities, a tile's
    weighted sum at most rows x min(BM, BN)."""
    return float(rows * min(block_m, block_n) + 1)


# --- tiles as the slash unit -----------------------------------------------------------------


def tile_selection(
    vert: Sequence[Tensor],
    slash: Sequence[Tensor],
    parts: Sequence[SparsePart],
    est_pos0: int,
    rows: int,
    vertical_sizes: Sequence[int],
    slash_sizes: Sequence[int],
    *,
    blocks: tuple[int, int],
    shared: bool = True,
) -> list[PartSelection]:
    """Slash budgets in kernel tiles on the BN grid (module doc), columns as in the diagonal
    unit. shared: one budget over all parts (continuous tiles cost 1, a folded one m), else
    every part its own."""
    block_m, block_n = blocks
    tiles = [-(-s // block_n) for s in slash_sizes]
    spans = [_slash_span(p, est_pos0, rows) for p in parts]
    if not shared or len(parts) == 1:
        verticals = [top_vertical(v, p, vertical_sizes, rows) for v, p in zip(vert, parts)]
        slashes = [
            _pick_tiles([_grid(slash[i], spans[i], p.causal, block_m, block_n)], [1], tiles,
                        rows, block_m, block_n)[0]
            for i, p in enumerate(parts)
        ]  # fmt: skip
        return [PartSelection(v, s) for v, s in zip(verticals, slashes, strict=True)]
    verticals = shared_columns(vert, parts, vertical_sizes, rows)
    line = [i for i, p in enumerate(parts) if not p.fold]
    d_lo = min(spans[i][1] for i in line)
    cont = _line_scores(slash, parts, spans, d_lo, 0.0)
    line_span = (d_lo, d_lo, d_lo + cont.shape[1] - 1)
    cands = [_grid(cont, line_span, True, block_m, block_n)]
    costs = [1]
    fold = [i for i, p in enumerate(parts) if p.fold]
    for i in fold:
        cands.append(_grid(slash[i], spans[i], False, block_m, block_n, forced=False))
        costs.append(parts[i].num_keys // parts[i].fold)
    picked = _pick_tiles(cands, costs, tiles, rows, block_m, block_n)
    return [
        PartSelection(verticals[i], picked[1 + fold.index(i)] if p.fold else picked[0])
        for i, p in enumerate(parts)
    ]


@dataclass(frozen=True)
class _Grid:
    """Candidate tiles of one score axis: selection distances [C] and scores [H, C] (-inf:
    out of reach), the first `forced` always kept."""

    distances: Tensor
    scores: Tensor
    forced: int


def _grid(
    scores: Tensor,
    span: tuple[int, int, int],
    causal: bool,
    block_m: int,
    block_n: int,
    forced: bool = True,
) -> _Grid:
    """Tile scores on the grid o = k BN of the selection distances: sum over d of S(d) n(d - o),
    S = scores (index u = distance first + u, valid from `lowest`), n the tile's pairs per
    row - key (module doc). Forced: the tiles that cover the LOCAL_DIAGONALS smallest
    reachable distances for every row of a block."""
    first, lowest, last = span
    dev = scores.device
    s = scores[:, lowest - first : last - first + 1].clamp(min=0.0)  # distances lowest..last
    lo = lowest - (block_m - 1)  # a tile at o sees distances o - BN + 1 .. o + BM - 1
    g0 = -(-lo // block_n) * block_n
    if causal:
        g0 = max(g0, 0)
    count = max(0, (last + block_n - 1 - g0) // block_n + 1)
    if count == 0:
        return _Grid(torch.zeros(0, dtype=torch.int64, device=dev), s[:, :0], 0)
    # pad so that window k covers distances g0 + k BN - BN + 1 .. g0 + k BN + BM - 1
    left = lowest - (g0 - block_n + 1)
    right = g0 + (count - 1) * block_n + block_m - 1 - last
    padded = torch.nn.functional.pad(s, (max(left, 0), max(right, 0)))[:, max(-left, 0) :]
    weights = _pair_counts(block_m, block_n, dev)
    w = torch.nn.functional.conv1d(padded[:, None], weights[None, None], stride=block_n)[:, 0]
    w = w[:, :count]
    w = torch.where(w > 0, w, float("-inf"))
    dist = g0 + block_n * torch.arange(count, device=dev, dtype=torch.int64)
    n_forced = 0
    if forced:
        reach = lowest + LOCAL_DIAGONALS - 1 + block_n  # last o whose tile still helps a row
        n_forced = min(count, max(0, (reach - g0 - 1) // block_n + 1))
    return _Grid(dist, w, n_forced)


def _pair_counts(block_m: int, block_n: int, device: torch.device) -> Tensor:
    """n(delta) for delta = j - (BN - 1), j = 0 .. BM + BN - 2: pairs (r, t) of a BM x BN
    tile with r - t = delta."""
    delta = torch.arange(-(block_n - 1), block_m, device=device)
    r = torch.arange(block_m, device=device)
    t = r[None, :] - delta[:, None]  # [deltas, BM]
    return ((t >= 0) & (t < block_n)).sum(1).float()


def _pick_tiles(
    grids: Sequence[_Grid],
    costs: Sequence[int],
    tiles: Sequence[int],
    rows: int,
    block_m: int,
    block_n: int,
) -> list[Tensor]:
    """Greedy by score / cost within each head's tile budget over the candidates of all grids
    (forced ones first); per grid the chosen selection distances [H, k], NO_SLASH padding."""
    top = _bound(rows, block_m, block_n)
    density, cost = [], []
    for g, c in zip(grids, costs, strict=True):
        d = g.scores / c
        if g.forced:
            d = d.clone()
            rank = torch.arange(g.forced, 0, -1, device=d.device, dtype=d.dtype)
            d[:, : g.forced] = top + rank
        density.append(d)
        cost.append(torch.full((g.scores.shape[1],), float(c), device=d.device))
    picked = _greedy(torch.cat(density, 1), torch.cat(cost), tiles)  # [H, k] or -1
    out, start = [], 0
    for g in grids:
        n = g.distances.shape[0]
        ok = (picked >= start) & (picked < start + n)
        at = (picked - start).clamp(0, max(n - 1, 0))
        dist = g.distances[at] if n else torch.zeros_like(picked)
        out.append(compact(torch.where(ok, dist, NO_SLASH), NO_SLASH))
        start += n
    return out


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
    size = host_tensor(list(sizes), density.device, spent.dtype)
    keep = (spent <= size[:, None]) & (order.values > float("-inf"))
    # Every candidate costs >= 1: a head keeps at most its size (a width known on the host).
    k = min(int(max(sizes, default=0)), density.shape[1])
    return torch.where(keep[:, :k], order.indices[:, :k], -1)


def top_vertical(scores: Tensor, part: SparsePart, sizes: Sequence[int], rows: int) -> Tensor:
    """Absolute key columns [Hq, k]: the first SINK_COLUMNS, then the highest scores."""
    scores = _force_first(scores, SINK_COLUMNS, _bound(rows))
    return part.key_lo + _top_per_head(scores, sizes, NO_COLUMN - part.key_lo)


def top_slash(
    scores: Tensor, part: SparsePart, est_pos0: int, rows: int, sizes: Sequence[int]
) -> Tensor:
    """Selection distances [Hq, k]: the LOCAL_DIAGONALS smallest reachable, then the best."""
    width = part.diagonal_width
    first = est_pos0 - part.key_lo + part.q_shift - width + 1  # distance of index 0
    lowest = max(first, part.q_shift) if part.causal else first  # causal: p - j >= 0
    valid = _force_first(scores[:, lowest - first :], LOCAL_DIAGONALS, _bound(rows))
    return lowest + _top_per_head(valid, sizes, NO_SLASH - lowest)


def _force_first(scores: Tensor, count: int, top: float) -> Tensor:
    """Rank the first `count` entries above every score (top: a bound on the scores, known on
    the host), earlier entries first."""
    out = scores.clone()
    count = min(count, out.shape[1])
    out[:, :count] = top + torch.arange(count, 0, -1, device=out.device, dtype=out.dtype)
    return out


def _top_per_head(scores: Tensor, sizes: Sequence[int], pad: int) -> Tensor:
    """Indices [H, max k] of each row's top sizes[h] scores; the rest of the row is `pad`."""
    k = min(max(sizes, default=0), scores.shape[1])
    idx = torch.topk(scores, k, dim=1).indices
    size = host_tensor(list(sizes), scores.device, torch.int64)
    keep = torch.arange(k, device=scores.device)[None, :] < size[:, None]
    return torch.where(keep, idx, torch.full_like(idx, pad))
