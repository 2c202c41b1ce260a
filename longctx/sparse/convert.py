"""Index conversion: selected diagonals and columns -> what each query block visits.

Query block b of a segment holds rows at absolute positions m0 .. m0 + BM - 1, m0 = q_pos0 + b BM
(the last block may be short: its missing rows are masked, the geometry stays BM tall).
Diagonal d (absolute distance p - j) crosses the block in keys [m0 - d, m0 + BM - d). Diagonals
sorted by distance, falling, give key ranges sorted by start; two neighbours overlap or touch
when their distances differ by at most BM, so a run of such diagonals [d_lo .. d_hi] is one
contiguous key range [m0 - d_hi, m0 + BM - d_lo) -- for every block alike. The runs ("slash
segments") are therefore merged once per head, not per block:

    distances   9 8 7 6 5 ... 3 2 1 0        run [d_lo, d_hi] -> keys [m0 - d_hi, m0 + BM - d_lo)
    block rows  m0 ........ m0 + BM          tiles of BN keys from m0 - d_hi:
    keys        |tile|tile|tile|..|tile|        key start m0 - o, o = d_hi - i BN
                                               key end min(start + BN, m0 + BM - d_lo)

Each run is cut into BN-wide tiles, stored per head as distances o (key start m0 - o) and the
run's d_lo (key end m0 + BM - d_lo): loop 1 of the kernel. The tiles a block actually reaches
(key range of the part, causal bound) are a contiguous run of that list, found by binary
search: tile_range[b]. Vertical columns not inside a run for block b, and inside the part's
keys, are listed per block (column_index, column_count): loop 2. Runs are disjoint and columns
exclude them, so no key is counted twice. Whether column v lies in a run depends only on
m0 + BM - v, so one bitmap per head over that offset answers it for every block.

MInference stores a [blocks, slash_size] block_offset per head; with runs merged per head the
slash index is [tiles per head] plus two ints per block, which at 1M tokens x 28 heads saves
gigabytes, and the conversion is a handful of vectorised torch ops (no per-block loop).
A block that would see none of its part's keys (budgets of 0) gets FALLBACK_COLUMNS evenly
spaced columns instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longctx.sparse.estimate import NO_COLUMN, NO_SLASH, PartSelection, SparsePart

Tensor = torch.Tensor

FALLBACK_COLUMNS = 16
NO_TILE = -(2**30)  # padding of int32 tile lists: key start m0 + 2^30 lies past every key
COLUMN_ELEMENTS = 2**25  # [heads, blocks, columns] elements processed at once
_BIG = 2**40


@dataclass(frozen=True)
class SegmentIndex:
    """Sparse index of one query segment, all parts stacked (P parts, H q heads, NB blocks).

    run_hi / run_lo [P, H, G] int64: merged slash runs (distances), padded with NO_SLASH.
    tile_o / tile_e [P, H, K] int32: tiles (key start m0 - o, key end <= m0 + BM - e), NO_TILE pad.
    tile_range [P, H, NB, 2] int32: first and past-last tile each block visits.
    columns [P, H, NB, VC] int32 sorted; column_count [P, H, NB] int32.
    part_info [P, 3] int32: key_lo, key_hi, causal.
    """

    parts: tuple[SparsePart, ...]
    q_pos0: int
    num_rows: int
    block_m: int
    block_n: int
    run_hi: Tensor
    run_lo: Tensor
    tile_o: Tensor
    tile_e: Tensor
    tile_range: Tensor
    columns: Tensor
    column_count: Tensor
    part_info: Tensor

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_m)

    def block_bounds(self) -> tuple[Tensor, Tensor]:
        """m0, m1 [NB] int64: each query block's first row and past-last real row."""
        return block_bounds(self.q_pos0, self.num_rows, self.block_m, self.tile_o.device)


def block_bounds(
    q_pos0: int, rows: int, block_m: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    m0 = q_pos0 + torch.arange(0, rows, block_m, device=device, dtype=torch.int64)
    return m0, (m0 + block_m).clamp(max=q_pos0 + rows)


def convert_indices(
    selections: Sequence[PartSelection],
    parts: Sequence[SparsePart],
    q_pos0: int,
    num_rows: int,
    *,
    block_m: int,
    block_n: int,
) -> SegmentIndex:
    """Per-part selections (estimate.estimate_indices) -> the kernel's index for the segment
    whose queries are at absolute positions q_pos0 .. q_pos0 + num_rows - 1."""
    device = selections[0].vertical.device
    m0, m1 = block_bounds(q_pos0, num_rows, block_m, device)
    per_part = [
        _convert_part(sel, part, m0, m1, block_m, block_n)
        for sel, part in zip(selections, parts, strict=True)
    ]
    info = torch.tensor(
        [[p.key_lo, p.key_hi, int(p.causal)] for p in parts], dtype=torch.int32, device=device
    )
    fields = zip(*per_part, strict=True)
    pads = (NO_SLASH, NO_SLASH, NO_TILE, NO_TILE, 0, 0, 0)
    stacked = [_stack_padded(list(f), pad) for f, pad in zip(fields, pads, strict=True)]
    return SegmentIndex(tuple(parts), q_pos0, num_rows, block_m, block_n, *stacked, info)


def _convert_part(
    sel: PartSelection, part: SparsePart, m0: Tensor, m1: Tensor, block_m: int, block_n: int
) -> tuple[Tensor, ...]:
    run_hi, run_lo = slash_runs(sel.slash, part, block_m)
    tile_o, tile_e = run_tiles(run_hi, run_lo, block_m, block_n)
    hi_eff = _visible_end(part, m1)
    tile_range = visible_tiles(tile_o, tile_e, m0, part.key_lo, hi_eff, block_m, block_n)
    columns, count = block_columns(sel.vertical, run_hi, run_lo, m0, part.key_lo, hi_eff, block_m)
    empty = (tile_range[..., 1] == tile_range[..., 0]) & (count == 0)
    columns, count = add_fallback(columns, count, empty, part, m0)
    return run_hi, run_lo, tile_o, tile_e, tile_range, columns, count


def _visible_end(part: SparsePart, m1: Tensor) -> Tensor:
    """[NB] past-last key any row of each block may see."""
    hi = torch.full_like(m1, part.key_hi)
    return torch.minimum(hi, m1) if part.causal else hi


def slash_runs(slash: Tensor, part: SparsePart, block_m: int) -> tuple[Tensor, Tensor]:
    """Selection distances [H, S] -> merged runs of absolute distances: (d_hi, d_lo) [H, G],
    sorted by d_hi falling (key start rising), padded with NO_SLASH."""
    shifts = torch.tensor(part.shifts(), device=slash.device, dtype=torch.int64)
    valid = slash != NO_SLASH
    d = torch.where(valid[..., None], slash[..., None] + shifts, NO_SLASH).flatten(1)
    d = d.sort(dim=1, descending=True).values
    valid = d != NO_SLASH
    new = torch.ones_like(valid)
    new[:, 1:] = (d[:, :-1] - d[:, 1:]) > block_m
    new &= valid
    last = valid.clone()
    last[:, :-1] &= new[:, 1:] | ~valid[:, 1:]
    run_id = new.cumsum(1) - 1
    width = max(1, int(new.sum(1).max()) if d.numel() else 0)  # >= 1: no empty tensors
    return _scatter_runs(d, new, run_id, width), _scatter_runs(d, last, run_id, width)


def _scatter_runs(d: Tensor, where: Tensor, run_id: Tensor, width: int) -> Tensor:
    out = torch.full((d.shape[0], width + 1), NO_SLASH, dtype=d.dtype, device=d.device)
    out.scatter_(1, torch.where(where, run_id, width), d)
    return out[:, :width].contiguous()


def run_tiles(run_hi: Tensor, run_lo: Tensor, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Cut every run into BN-wide tiles: (o, e) [H, K] int32: key start m0 - o, key end
    m0 + BM - e."""
    heads, runs = run_hi.shape
    valid = run_hi != NO_SLASH
    counts = torch.where(valid, (run_hi - run_lo + block_m + block_n - 1) // block_n, 0).flatten()
    per_head = counts.view(heads, runs).sum(1)
    width = max(1, int(per_head.max()) if heads else 0)
    run_of_tile = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts
    )
    tile = torch.arange(run_of_tile.numel(), device=counts.device)
    within = tile - (counts.cumsum(0) - counts)[run_of_tile]
    head = run_of_tile // max(runs, 1)
    slot = tile - (per_head.cumsum(0) - per_head)[head]
    tile_o = torch.full((heads, width), NO_TILE, dtype=torch.int32, device=counts.device)
    tile_e = torch.full_like(tile_o, NO_TILE)
    tile_o[head, slot] = (run_hi.flatten()[run_of_tile] - within * block_n).int()
    tile_e[head, slot] = run_lo.flatten()[run_of_tile].int()
    return tile_o, tile_e


def visible_tiles(
    tile_o: Tensor, tile_e: Tensor, m0: Tensor, lo: int, hi_eff: Tensor, block_m: int, block_n: int
) -> Tensor:
    """[H, NB, 2] int32: the tiles whose keys meet [lo, hi_eff) for each block.

    Tile k spans [m0 - o_k, min(m0 - o_k + BN, m0 + BM - e_k)); both ends rise with k.
    """
    heads = tile_o.shape[0]
    neg_o, neg_e = (-tile_o.long()).contiguous(), (-tile_e.long()).contiguous()
    ask = lambda seq, v, right: torch.searchsorted(
        seq, v.expand(heads, -1).contiguous(), right=right
    )
    first = torch.maximum(
        ask(neg_o, (lo - m0 - block_n)[None], True), ask(neg_e, (lo - m0 - block_m)[None], True)
    )
    last = torch.maximum(ask(neg_o, (hi_eff - m0)[None], False), first)
    return torch.stack([first, last], dim=-1).int()


def covered_offsets(run_hi: Tensor, run_lo: Tensor, block_m: int, size: int) -> Tensor:
    """[H, size] bool: entry y is True when the column v = m0 + BM - y lies in a run of the
    block at m0, i.e. m0 - d_hi <= v < m0 + BM - d_lo, i.e. d_lo < y <= d_hi + BM."""
    one = (run_hi != NO_SLASH).int()
    diff = torch.zeros((run_hi.shape[0], size + 1), dtype=torch.int32, device=run_hi.device)
    diff.scatter_add_(1, (run_lo + 1).clamp(0, size), one)
    diff.scatter_add_(1, (run_hi + block_m + 1).clamp(0, size), -one)
    return diff[:, :size].cumsum(1) > 0


def block_columns(
    vertical: Tensor,
    run_hi: Tensor,
    run_lo: Tensor,
    m0: Tensor,
    lo: int,
    hi_eff: Tensor,
    block_m: int,
) -> tuple[Tensor, Tensor]:
    """Columns [H, NB, V] int32 (sorted, compacted) and counts [H, NB] int32: the selected
    columns in [lo, hi_eff) that no slash run of the block covers (duplicates dropped)."""
    heads, width = vertical.shape
    cols = torch.where(vertical == NO_COLUMN, _BIG, vertical).sort(dim=1).values  # [H, V]
    dup = torch.zeros_like(cols, dtype=torch.bool)
    dup[:, 1:] = cols[:, 1:] == cols[:, :-1]
    cols = torch.where(dup, _BIG, cols)  # still ascending among the columns kept
    size = (int(m0.max()) if m0.numel() else lo) - lo + block_m + 1
    covered = covered_offsets(run_hi, run_lo, block_m, size)
    step = max(1, COLUMN_ELEMENTS // max(1, heads * width))
    outs, counts = [], []
    for b0 in range(0, m0.numel(), step):
        b1 = min(b0 + step, m0.numel())
        out, count = _columns_slice(cols, covered, m0[b0:b1], lo, hi_eff[b0:b1], block_m)
        outs.append(out)
        counts.append(count)
    return torch.cat(outs, 1), torch.cat(counts, 1)


def _columns_slice(
    cols: Tensor, covered: Tensor, m0: Tensor, lo: int, hi_eff: Tensor, block_m: int
) -> tuple[Tensor, Tensor]:
    heads, width = cols.shape
    nb = m0.numel()
    v = cols[:, None, :]  # [H, 1, V]
    y = (m0[None, :, None] + block_m - v).clamp(0, covered.shape[1] - 1)  # [H, nb, V]
    hit = covered.gather(1, y.view(heads, -1)).view(heads, nb, width)
    keep = (v >= lo) & (v < hi_eff[None, :, None]) & ~hit
    slot = torch.where(keep, keep.cumsum(-1) - 1, width)
    out = torch.zeros((heads, nb, width + 1), dtype=torch.int32, device=cols.device)
    out.scatter_(2, slot, v.expand(heads, nb, width).int())
    return out[..., :width], keep.sum(-1).int()


def add_fallback(
    columns: Tensor, count: Tensor, empty: Tensor, part: SparsePart, m0: Tensor
) -> tuple[Tensor, Tensor]:
    """Blocks that see no key of the part get evenly spaced columns among the keys every
    row of the block sees (up to FALLBACK_COLUMNS)."""
    hi_all = (
        torch.clamp(m0 + 1, max=part.key_hi) if part.causal else torch.full_like(m0, part.key_hi)
    )
    size = (hi_all - part.key_lo).clamp(min=0)  # [NB]
    empty = empty & (size > 0)[None, :]
    if not bool(empty.any()):
        return columns, count
    if columns.shape[-1] < FALLBACK_COLUMNS:
        columns = torch.nn.functional.pad(columns, (0, FALLBACK_COLUMNS - columns.shape[-1]))
    n = size.clamp(max=FALLBACK_COLUMNS)  # [NB]
    i = torch.arange(FALLBACK_COLUMNS, device=m0.device)
    spread = part.key_lo + (i[None, :] * size[:, None]) // n.clamp(min=1)[:, None]  # [NB, F]
    fill = columns.clone()
    fill[..., :FALLBACK_COLUMNS] = spread.int()[None]
    columns = torch.where(empty[..., None], fill, columns)
    count = torch.where(empty, n.int()[None, :], count)
    return columns, count


def _stack_padded(tensors: list[Tensor], pad: int) -> Tensor:
    """Stack along a new first axis, padding the last axis (runs, tiles, columns) to the
    widest part."""
    width = max(1, *(t.shape[-1] for t in tensors))  # kernels get no empty tensors
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=pad) for t in tensors]
    return torch.stack(padded).contiguous()
