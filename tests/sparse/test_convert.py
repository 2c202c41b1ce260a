"""Index conversion against explicit loops: slash runs merged MInference-style, tiles, the tiles
each query block visits, uncovered columns; the sets of keys they name, and the fallback."""

from __future__ import annotations

import time

import pytest
import torch

from longctx.sparse.convert import FALLBACK_COLUMNS, NO_TILE, convert_indices
from longctx.sparse.estimate import NO_COLUMN, NO_SLASH, PartSelection, SparsePart
from longctx.sparse.reference import index_masks, selection_masks
from tests.sparse.helpers import DCA, segments

HQ = 3


def random_selection(part: SparsePart, q_end: int, nv: int, ns: int, seed: int) -> PartSelection:
    """Random distinct columns of the part and random distances (clustered near 0 and spread),
    padded like the estimator pads."""
    g = torch.Generator().manual_seed(seed)
    cols, dists = [], []
    for h in range(HQ):
        c = part.key_lo + torch.randperm(part.num_keys, generator=g)[: max(0, nv - h)]
        span = q_end + abs(part.q_shift)
        d = torch.randperm(span, generator=g)[: ns + h] - (part.q_shift if part.fold else 0)
        cols.append(torch.cat([c, torch.full((nv - c.numel(),), NO_COLUMN)]))
        dists.append(torch.cat([d, torch.full((ns + HQ - d.numel(),), NO_SLASH)])[: ns + HQ])
    return PartSelection(torch.stack(cols).long(), torch.stack(dists).long())


def brute_runs(dists: list[int], block_m: int) -> list[tuple[int, int]]:
    """MInference's merge loop: distances falling; a gap over block_m starts a new run."""
    runs = []
    for d in sorted(set(dists), reverse=True):
        if runs and runs[-1][1] - d <= block_m:
            runs[-1] = (runs[-1][0], d)
        else:
            runs.append((d, d))
    return runs


CASES = [
    (100, 190, None, 16, 8),
    (100, 190, None, 32, 32),
    (150, 250, DCA, 16, 16),
    (40, 60, DCA, 8, 16),
]


@pytest.mark.parametrize("q_start,q_end,dca,block_m,block_n", CASES)
def test_index_matches_loops(q_start, q_end, dca, block_m, block_n):
    for s0, s1, parts in segments(q_start, q_end, dca):
        sels = [random_selection(p, s1, 12, 9, seed=s0 + i) for i, p in enumerate(parts)]
        index = convert_indices(sels, parts, s0, s1 - s0, block_m=block_m, block_n=block_n)
        m0 = [s0 + b for b in range(0, s1 - s0, block_m)]
        for pi, (sel, part) in enumerate(zip(sels, parts)):
            for h in range(HQ):
                dists = [int(d) + s for d in sel.slash[h] if d != NO_SLASH for s in part.shifts()]
                runs = brute_runs(dists, block_m)
                got_runs = [
                    (int(a), int(b))
                    for a, b in zip(index.run_hi[pi, h], index.run_lo[pi, h])
                    if a != NO_SLASH
                ]
                assert got_runs == runs
                tiles = [
                    (hi - i * block_n, lo)
                    for hi, lo in runs
                    for i in range(-(-(hi - lo + block_m) // block_n))
                ]
                got_tiles = [
                    (int(o), int(e))
                    for o, e in zip(index.tile_o[pi, h], index.tile_e[pi, h])
                    if o != NO_TILE
                ]
                assert got_tiles == tiles
                for b, start in enumerate(m0):
                    _check_block(
                        index,
                        pi,
                        h,
                        b,
                        start,
                        min(start + block_m, s1),
                        part,
                        sel,
                        runs,
                        tiles,
                        block_n,
                    )


def _check_block(index, pi, h, b, m0, m1, part, sel, runs, tiles, block_n):
    hi = min(part.key_hi, m1) if part.causal else part.key_hi
    lo = part.key_lo
    bm = index.block_m
    covered = {j for d_hi, d_lo in runs for j in range(m0 - d_hi, m0 + bm - d_lo)}
    first, last = (int(x) for x in index.tile_range[pi, h, b])
    visited = set()
    for k, (o, e) in enumerate(tiles):
        span = range(max(m0 - o, lo), min(m0 - o + block_n, m0 + bm - e, hi))
        if first <= k < last:
            visited |= set(span)
        else:
            assert not span, f"tile {k} reaches keys but is not visited"
    assert visited == {j for j in covered if lo <= j < hi}
    cols = [int(c) for c in sel.vertical[h] if c != NO_COLUMN]
    want = sorted(c for c in cols if lo <= c < hi and c not in covered)
    if not visited and not want:  # nothing from this part: evenly spaced fallback columns
        size = (min(m0 + 1, part.key_hi) if part.causal else part.key_hi) - lo
        n = min(FALLBACK_COLUMNS, size)
        want = [lo + i * size // n for i in range(n)]
    count = int(index.column_count[pi, h, b])
    assert index.columns[pi, h, b, :count].tolist() == want


@pytest.mark.parametrize("q_start,q_end,dca", [(100, 190, None), (150, 250, DCA)])
def test_keys_named_cover_the_selection(q_start, q_end, dca):
    """Every (row, key) the selected diagonals and columns name is attended; the rest of what
    is attended lies on the BM-wide bands of the runs."""
    for s0, s1, parts in segments(q_start, q_end, dca):
        sels = [random_selection(p, s1, 6, 20, seed=7 + i) for i, p in enumerate(parts)]
        index = convert_indices(sels, parts, s0, s1 - s0, block_m=16, block_n=16)
        attended = index_masks(index, s1)
        named = selection_masks(sels, parts, s0, s1 - s0, s1)
        assert not (named & ~attended).any()
        assert attended.sum() <= 16 * named.sum()


def test_fallback_for_a_part_with_no_index():
    (s0, s1, parts), *_ = segments(150, 190, DCA)
    empty = PartSelection(
        torch.full((HQ, 4), NO_COLUMN, dtype=torch.long), torch.full((HQ, 4), NO_SLASH)
    )
    index = convert_indices([empty] * len(parts), parts, s0, s1 - s0, block_m=16, block_n=16)
    for pi, part in enumerate(parts):
        assert (index.tile_range[pi, ..., 1] == index.tile_range[pi, ..., 0]).all()
        count = index.column_count[pi]
        assert (
            count == min(FALLBACK_COLUMNS, part.num_keys if not part.causal else 10**9)
        ).all() or part.causal
        cols = index.columns[pi, 0, 0, : int(count[0, 0])]
        assert cols.unique().numel() == cols.numel()
        assert (cols >= part.key_lo).all() and (cols < part.key_hi).all()
        if part.causal:  # only keys the block's first row sees
            assert (cols <= s0).all()


def test_many_blocks_convert_quickly():
    """Vectorised: 4096 query blocks x 8 heads x 1000 columns, no per-block loop."""
    part = SparsePart(0, 262144, causal=True)
    g = torch.Generator().manual_seed(0)
    cols = torch.randint(0, 262144, (8, 1000), generator=g)
    dists = torch.cat(
        [torch.arange(6000).expand(8, -1), torch.randint(6000, 262144, (8, 96), generator=g)], 1
    )
    start = time.perf_counter()
    index = convert_indices([PartSelection(cols, dists)], [part], 0, 262144, block_m=64, block_n=64)
    assert time.perf_counter() - start < 30
    assert index.columns.shape[:3] == (1, 8, 4096)
