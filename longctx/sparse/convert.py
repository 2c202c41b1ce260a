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

from longctx.sparse.estimate import NO_COLUMN, NO_SLASH, PartSelection, SparsePart, host_tensor

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
    whose queries are at absolute positions q_pos0 .. q_pos0 + num_rows - 1.

    All parts go through every step together (a leading part axis, per-part key ranges as
    tensors), so the conversion is a few dozen device operations whatever the part count, and
    none of them waits for the device: every width follows from the selections' widths."""
    device = selections[0].vertical.device
    m0, m1 = block_bounds(q_pos0, num_rows, block_m, device)
    m0_last = q_pos0 + (m0.numel() - 1) * block_m  # on the host: no synchronisation
    info_rows = [[p.key_lo, p.key_hi, int(p.causal)] for p in parts]
    info = host_tensor(info_rows, device, torch.int32)
    lo = info[:, 0].long()[:, None]  # [P, 1]
    hi_eff = torch.where(info[:, 2:3] != 0, torch.minimum(info[:, 1:2].long(), m1), info[:, 1:2])
    run_hi, run_lo = slash_runs([s.slash for s in selections], parts, block_m)
    tile_o, tile_e = run_tiles(run_hi, run_lo, block_m, block_n)
    tile_range = visible_tiles(tile_o, tile_e, m0, lo, hi_eff, block_m, block_n)
    vertical = _stack_padded([s.vertical for s in selections], NO_COLUMN)
    columns, count = block_columns(vertical, run_hi, run_lo, m0, lo, hi_eff, block_m, m0_last)
    empty = (tile_range[..., 1] == tile_range[..., 0]) & (count == 0)
    columns, count = add_fallback(columns, count, empty, parts, m0)
    return SegmentIndex(
        tuple(parts), q_pos0, num_rows, block_m, block_n,
        run_hi, run_lo, tile_o, tile_e, tile_range, columns.contiguous(), count.contiguous(), info,
    )  # fmt: skip


def slash_runs(
    slashes: Sequence[Tensor], parts: Sequence[SparsePart], block_m: int
) -> tuple[Tensor, Tensor]:
    """Selection distances per part [H, S_p] -> merged runs of absolute distances: (d_hi, d_lo)
    [P, H, G], sorted by d_hi falling (key start rising), padded with NO_SLASH. A part's shifts
    (inter: one per older chunk) are padded to the most any part has."""
    slash = _stack_padded(list(slashes), NO_SLASH)  # [P, H, S]
    shifts = [list(p.shifts()) for p in parts]
    width = max(len(x) for x in shifts)
    pad = [[0] * (width - len(x)) for x in shifts]
    table = host_tensor([x + z for x, z in zip(shifts, pad)], slash.device, torch.int64)
    real = host_tensor([[1] * len(x) + z for x, z in zip(shifts, pad)], slash.device, torch.bool)
    valid = (slash != NO_SLASH)[..., None] & real[:, None, None, :]
    d = torch.where(valid, slash[..., None] + table[:, None, None, :], NO_SLASH).flatten(2)
    d = d.sort(dim=-1, descending=True).values
    valid = d != NO_SLASH
    new = torch.ones_like(valid)
    new[..., 1:] = (d[..., :-1] - d[..., 1:]) > block_m
    new &= valid
    last = valid.clone()
    last[..., :-1] &= new[..., 1:] | ~valid[..., 1:]
    run_id = new.cumsum(-1) - 1
    # Every distance may start a run: a width known on the host (>= 1: no empty tensors).
    width = max(1, d.shape[-1])
    return _scatter_runs(d, new, run_id, width), _scatter_runs(d, last, run_id, width)


def _scatter_runs(d: Tensor, where: Tensor, run_id: Tensor, width: int) -> Tensor:
    out = torch.full((*d.shape[:-1], width + 1), NO_SLASH, dtype=d.dtype, device=d.device)
    out.scatter_(-1, torch.where(where, run_id, width), d)
    return out[..., :width].contiguous()


def run_tiles(run_hi: Tensor, run_lo: Tensor, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Cut every run into BN-wide tiles: (o, e) [..., K] int32: key start m0 - o, key end
    m0 + BM - e.

    K is a bound known on the host: a run of k merged diagonals spans at most (k - 1) BM
    distances, so it needs at most ceil(k BM / BN) tiles, and the runs hold at most G
    diagonals. Tile slot t of a head belongs to the run whose tile counts, summed, first pass t.
    """
    runs = run_hi.shape[-1]
    valid = run_hi != NO_SLASH
    counts = torch.where(valid, (run_hi - run_lo + block_m + block_n - 1) // block_n, 0)
    width = max(1, runs * -(-block_m // block_n))
    ends = counts.cumsum(-1)  # [..., G]
    slot = torch.arange(width, device=run_hi.device).expand(*run_hi.shape[:-1], width)
    run = torch.searchsorted(ends, slot.contiguous(), right=True).clamp(max=max(runs - 1, 0))
    within = slot - (ends.gather(-1, run) - counts.gather(-1, run))
    live = slot < ends[..., -1:]
    tile_o = torch.where(live, run_hi.gather(-1, run) - within * block_n, NO_TILE).int()
    tile_e = torch.where(live, run_lo.gather(-1, run), NO_TILE).int()
    return tile_o, tile_e


def visible_tiles(
    tile_o: Tensor,
    tile_e: Tensor,
    m0: Tensor,
    lo: Tensor,
    hi_eff: Tensor,
    block_m: int,
    block_n: int,
) -> Tensor:
    """[P, H, NB, 2] int32: the tiles whose keys meet [lo, hi_eff) for each block (lo [P, 1],
    hi_eff [P, NB] per part).

    Tile k spans [m0 - o_k, min(m0 - o_k + BN, m0 + BM - e_k)); both ends rise with k.
    """
    heads = tile_o.shape[1]
    neg_o, neg_e = (-tile_o.long()).contiguous(), (-tile_e.long()).contiguous()

    def ask(seq: Tensor, v: Tensor, right: bool) -> Tensor:  # v [P, NB] -> [P, H, NB]
        return torch.searchsorted(seq, v[:, None].expand(-1, heads, -1).contiguous(), right=right)

    first = torch.maximum(ask(neg_o, lo - m0 - block_n, True), ask(neg_e, lo - m0 - block_m, True))
    last = torch.maximum(ask(neg_o, hi_eff - m0, False), first)
    return torch.stack([first, last], dim=-1).int()


def block_columns(
    vertical: Tensor,
    run_hi: Tensor,
    run_lo: Tensor,
    m0: Tensor,
    lo: Tensor,
    hi_eff: Tensor,
    block_m: int,
    m0_last: int,
) -> tuple[Tensor, Tensor]:
    """Columns [P, H, NB, V] int32 (sorted, compacted) and counts [P, H, NB] int32: the
    selected columns in [lo, hi_eff) that no slash run of the block covers (duplicates
    dropped). Column v of the block at m0 lies in run [d_lo, d_hi] when
    d_lo < y <= d_hi + BM, y = m0 + BM - v; the runs' intervals are disjoint and fall with the
    run index, so one binary search finds the only run that can hold it."""
    parts, heads, width = vertical.shape
    cols = torch.where(vertical == NO_COLUMN, _BIG, vertical).sort(dim=-1).values  # [P, H, V]
    dup = torch.zeros_like(cols, dtype=torch.bool)
    dup[..., 1:] = cols[..., 1:] == cols[..., :-1]
    cols = torch.where(dup, _BIG, cols)  # still ascending among the columns kept
    reach = (-(run_hi + block_m)).contiguous()  # ascending: d_hi + BM falls with the index
    step = max(1, COLUMN_ELEMENTS // max(1, parts * heads * width))
    outs, counts = [], []
    for b0 in range(0, m0.numel(), step):
        b1 = min(b0 + step, m0.numel())
        out, count = _columns_slice(cols, reach, run_lo, m0[b0:b1], lo, hi_eff[:, b0:b1], block_m)
        outs.append(out)
        counts.append(count)
    return torch.cat(outs, 2), torch.cat(counts, 2)


def _columns_slice(
    cols: Tensor,
    reach: Tensor,
    run_lo: Tensor,
    m0: Tensor,
    lo: Tensor,
    hi_eff: Tensor,
    block_m: int,
) -> tuple[Tensor, Tensor]:
    parts, heads, width = cols.shape
    nb = m0.numel()
    v = cols[:, :, None, :]  # [P, H, 1, V]
    y = m0[None, None, :, None] + block_m - v  # [P, H, nb, V]
    at = torch.searchsorted(reach, (-y).flatten(2).contiguous(), right=True) - 1
    at = at.clamp(min=0)
    hit = (reach.gather(-1, at) <= -y.flatten(2)) & (run_lo.gather(-1, at) < y.flatten(2))
    hit = hit.view(parts, heads, nb, width)
    keep = (v >= lo[:, :, None, None]) & (v < hi_eff[:, None, :, None]) & ~hit
    slot = torch.where(keep, keep.cumsum(-1) - 1, width)
    out = torch.zeros((parts, heads, nb, width + 1), dtype=torch.int32, device=cols.device)
    out.scatter_(-1, slot, v.expand(parts, heads, nb, width).int())
    return out[..., :width], keep.sum(-1).int()


def add_fallback(
    columns: Tensor, count: Tensor, empty: Tensor, parts: Sequence[SparsePart], m0: Tensor
) -> tuple[Tensor, Tensor]:
    """Blocks that see no key of their part get evenly spaced columns among the keys every
    row of the block sees (up to FALLBACK_COLUMNS). Applied whether or not a block is empty:
    asking would synchronise with the device."""
    dev = m0.device
    rows = [[p.key_lo, p.key_hi, int(p.causal)] for p in parts]
    info = host_tensor(rows, dev, torch.int64)
    key_lo, key_hi, causal = info[:, 0:1], info[:, 1:2], info[:, 2:3] != 0
    hi_all = torch.where(causal, torch.minimum(m0[None] + 1, key_hi), key_hi)  # [P, NB]
    size = (hi_all - key_lo).clamp(min=0)
    empty = empty & (size > 0)[:, None, :]
    if columns.shape[-1] < FALLBACK_COLUMNS:
        columns = torch.nn.functional.pad(columns, (0, FALLBACK_COLUMNS - columns.shape[-1]))
    n = size.clamp(max=FALLBACK_COLUMNS)  # [P, NB]
    i = torch.arange(FALLBACK_COLUMNS, device=dev)
    spread = key_lo[..., None] + (i * size[..., None]) // n.clamp(min=1)[..., None]  # [P, NB, F]
    fill = columns.clone()
    fill[..., :FALLBACK_COLUMNS] = spread.int()[:, None]
    columns = torch.where(empty[..., None], fill, columns)
    count = torch.where(empty, n.int()[:, None, :], count)
    return columns, count


def _stack_padded(tensors: list[Tensor], pad: int) -> Tensor:
    """Stack along a new first axis, padding the last axis (runs, tiles, columns) to the
    widest part."""
    width = max(1, *(t.shape[-1] for t in tensors))  # kernels get no empty tensors
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=pad) for t in tensors]
    return torch.stack(padded).contiguous()
