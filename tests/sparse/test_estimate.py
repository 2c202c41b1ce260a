"""Online index estimation against explicit loops: softmax over the union of a row's keys in
every part, column sums, sums along selection diagonals (continuous positions, inter folded),
forced sink columns and local diagonals, per-head top-k with per-head budgets, spent per DCA
part or once over all parts."""

from __future__ import annotations

import pytest
import torch

from longctx.sparse.estimate import (
    LOCAL_DIAGONALS,
    NO_COLUMN,
    NO_SLASH,
    SINK_COLUMNS,
    DiagonalSums,
    estimate_indices,
    part_scores,
)
from tests.sparse.helpers import DCA, randn, segments

HQ, HKV, D, SCALE = 4, 2, 16, 0.3


def brute_scores(q_sel, keys, parts, est_pos0):
    """Explicit loops: {part: {head: (vertical {key: score}, slash {distance: score})}}."""
    rows, groups = q_sel.shape[1], HQ // HKV
    out = [[({}, {}) for _ in range(HQ)] for _ in parts]
    for h in range(HQ):
        for i in range(rows):
            pos = est_pos0 + i
            logits = []  # (part, key, logit)
            for pi, part in enumerate(parts):
                for j in range(part.key_lo, part.key_hi):
                    if part.causal and j > pos:
                        continue
                    s = float(q_sel[pi, i, h].double() @ keys[j, h // groups].double()) * SCALE
                    logits.append((pi, j, s))
            lse = torch.logsumexp(torch.tensor([s for _, _, s in logits]), 0).item()
            for pi, j, s in logits:
                part = parts[pi]
                prob = torch.exp(torch.tensor(s - lse)).item()
                coord = (j - part.key_lo) % part.fold if part.fold else j - part.key_lo
                dist = pos - part.key_lo + part.q_shift - coord
                vert, slash = out[pi][h]
                vert[j] = vert.get(j, 0.0) + prob
                slash[dist] = slash.get(dist, 0.0) + prob
    return out


def brute_top(scores: dict, forced: list, k: int) -> set:
    rest = sorted((x for x in scores if x not in forced), key=lambda x: -scores[x])
    return set((forced + rest)[:k])


CASES = [
    # (q_start, q_end, dca, rows, vertical sizes, slash sizes)
    (100, 190, None, 8, [40, 5, 0, 200], [120, 7, 130, 0]),
    (150, 250, DCA, 6, [35, 3, 64, 1], [110, 9, 0, 140]),  # two segments, three parts
]


@pytest.mark.parametrize("q_start,q_end,dca,rows,vsizes,ssizes", CASES)
def test_selection_matches_brute_force(q_start, q_end, dca, rows, vsizes, ssizes):
    keys = randn(q_end, HKV, D, seed=1)
    for seg_start, seg_end, parts in segments(q_start, q_end, dca):
        q_sel = randn(len(parts), rows, HQ, D, seed=seg_start)
        est = seg_end - rows
        got = estimate_indices(
            q_sel, keys[:seg_end], parts, est, vsizes, ssizes, scale=SCALE, shared_budget=False
        )
        want = brute_scores(q_sel, keys, parts, est)
        for pi, part in enumerate(parts):
            for h in range(HQ):
                vert, slash = want[pi][h]
                sinks = [
                    j for j in range(part.key_lo, part.key_hi) if j - part.key_lo < SINK_COLUMNS
                ]
                local = sorted(slash)[:LOCAL_DIAGONALS]
                cols = {int(c) for c in got[pi].vertical[h] if c != NO_COLUMN}
                dists = {int(d) for d in got[pi].slash[h] if d != NO_SLASH}
                assert cols == brute_top(vert, sinks, vsizes[h]), (pi, h)
                assert dists == brute_top(slash, local, ssizes[h]), (pi, h)


def brute_shared(want, parts, vsize: int, ssize: int, h: int):
    """One budget over all parts: (columns, continuous distances, inter folded distances)."""
    vert = {j: x for pi in range(len(parts)) for j, x in want[pi][h][0].items()}
    cols = brute_top(vert, [j for j in sorted(vert) if j < SINK_COLUMNS], vsize)
    line = {}  # intra + successive scores per continuous distance
    cands = []  # (density, cost, kind, distance)
    for pi, part in enumerate(parts):
        for d, x in want[pi][h][1].items():
            if part.fold:
                m = part.num_keys // part.fold
                cands.append((x / m, m, "inter", d))
            else:
                line[d] = line.get(d, 0.0) + x
    forced = sorted(line)[:LOCAL_DIAGONALS]
    cands += [(x, 1, "line", d) for d, x in line.items() if d not in forced]
    cands = [(float("inf"), 1, "line", d) for d in forced] + sorted(cands, key=lambda c: -c[0])
    picked, spent = {"line": set(), "inter": set()}, 0
    for _, cost, kind, d in cands:
        if spent + cost > ssize:
            break
        spent += cost
        picked[kind].add(d)
    return cols, picked["line"], picked["inter"]


@pytest.mark.parametrize(
    "rows,vsizes,ssizes",
    [(6, [35, 3, 64, 1], [110, 9, 0, 140]), (4, [300, 0, 31, 2], [400, 101, 1, 57])],
)
def test_shared_budget_matches_brute_force(rows, vsizes, ssizes):
    """DCA segments of three and two parts: columns compete over the whole sequence, intra and
    successive distances add up as one line, inter's folded lines cost one line per chunk."""
    keys = randn(250, HKV, D, seed=5)
    seen = set()
    for seg_start, seg_end, parts in segments(100, 250, DCA):
        q_sel = randn(len(parts), rows, HQ, D, seed=seg_start + 1)
        est = seg_end - rows
        got = estimate_indices(q_sel, keys[:seg_end], parts, est, vsizes, ssizes, scale=SCALE)
        want = brute_scores(q_sel, keys, parts, est)
        seen.add(len(parts))
        for h in range(HQ):
            cols, lines, inter = brute_shared(want, parts, vsizes[h], ssizes[h], h)
            got_cols = set()
            for pi, part in enumerate(parts):
                mine = {int(c) for c in got[pi].vertical[h] if c != NO_COLUMN}
                assert all(part.key_lo <= c < part.key_hi for c in mine), (pi, h)
                got_cols |= mine
                dists = {int(d) for d in got[pi].slash[h] if d != NO_SLASH}
                assert dists == (inter if part.fold else lines), (pi, h)
            assert got_cols == cols, h
            spent = len(lines) + sum(p.num_keys // p.fold for p in parts if p.fold) * len(inter)
            assert spent <= ssizes[h]
    assert seen == {2, 3}


def test_scores_match_brute_force_with_small_memory_budget():
    """Heads processed a few at a time (max_elements tiny) give the same sums."""
    (_, seg_end, parts), *_ = segments(150, 190, DCA)
    keys = randn(seg_end, HKV, D, seed=2)
    q_sel = randn(len(parts), 5, HQ, D, seed=3)
    vert, slash = part_scores(q_sel, keys, parts, seg_end - 5, scale=SCALE, max_elements=1)
    want = brute_scores(q_sel, keys, parts, seg_end - 5)
    for pi, part in enumerate(parts):
        width = part.diagonal_width
        first = seg_end - 5 - part.key_lo + part.q_shift - width + 1
        for h in range(HQ):
            v, s = want[pi][h]
            for j, x in v.items():
                assert abs(vert[pi][h, j - part.key_lo].item() - x) < 1e-5
            for d, x in s.items():
                assert abs(slash[pi][h, d - first].item() - x) < 1e-5


@pytest.mark.parametrize("rows,width", [(5, 11), (7, 3), (1, 4), (4, 1)])
def test_diagonal_sums_against_loops(rows, width):
    probs = randn(3, rows, width, seed=4)
    diag = DiagonalSums(3, rows, width, probs.device)
    diag.centre.copy_(probs)
    got = diag.sums()
    want = torch.zeros(3, rows + width - 1)
    for g in range(3):
        for i in range(rows):
            for t in range(width):
                want[g, i - t + width - 1] += probs[g, i, t]
    torch.testing.assert_close(got, want)


# --- slash budgets in kernel tiles ---------------------------------------------------------


def pair_count(delta: int, bm: int, bn: int) -> int:
    return sum(1 for r in range(bm) if 0 <= r - delta < bn)


def grid_candidates(scores: dict, bm: int, bn: int, causal: bool) -> dict:
    """{o: sum_d S(d) n(d - o)} over the BN grid reaching the distances of `scores`."""
    lowest, last = min(scores), max(scores)
    g0 = -(-(lowest - bm + 1) // bn) * bn
    if causal:
        g0 = max(g0, 0)
    out = {}
    o = g0
    while o <= last + bn - 1:
        out[o] = sum(x * pair_count(d - o, bm, bn) for d, x in scores.items())
        o += bn
    return out


def greedy_tiles(forced: list, cands: list, budget: int) -> set:
    """forced: [(kind, o)] kept first; cands: [(density, cost, kind, o)]."""
    picked, spent = set(), 0
    ranked = [(float("inf"), 1, k, o) for k, o in forced]
    ranked += sorted((c for c in cands if c[0] > 0), key=lambda c: -c[0])
    for _, cost, kind, o in ranked:
        if spent + cost > budget:
            break
        spent += cost
        picked.add((kind, o))
    return picked


def brute_tiles(want, parts, h, ssize, bm, bn, shared, local):
    tiles = -(-ssize // bn)
    if not shared:
        out = []
        for pi, part in enumerate(parts):
            scores = want[pi][h][1]
            grid = grid_candidates(scores, bm, bn, part.causal)
            reach = min(scores) + local + bn - 2
            forced = [("p", o) for o in sorted(grid) if o <= reach]
            cands = [(w, 1, "p", o) for o, w in grid.items() if ("p", o) not in forced]
            out.append({o for _, o in greedy_tiles(forced, cands, tiles)})
        return out
    line = {}
    for pi, part in enumerate(parts):
        if not part.fold:
            for d, x in want[pi][h][1].items():
                line[d] = line.get(d, 0.0) + x
    grid = grid_candidates(line, bm, bn, True)
    reach = min(line) + local + bn - 2
    forced = [("line", o) for o in sorted(grid) if o <= reach]
    cands = [(w, 1, "line", o) for o, w in grid.items() if ("line", o) not in forced]
    for pi, part in enumerate(parts):
        if part.fold:
            m = part.num_keys // part.fold
            fold = grid_candidates(want[pi][h][1], bm, bn, False)
            cands += [(w / m, m, "inter", o) for o, w in fold.items()]
    picked = greedy_tiles(forced, cands, tiles)
    return [
        {o for kind, o in picked if kind == ("inter" if part.fold else "line")} for part in parts
    ]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("blocks", [(8, 8), (8, 4), (4, 8)])
def test_tile_budget_matches_brute_force(monkeypatch, shared, blocks):
    """Slash budgets in kernel tiles: grid points k BN scored by the pairs a BM x BN tile at
    that distance covers, the tiles of the nearest diagonals forced, folded inter tiles at
    cost m, greedy by score / cost; columns as in the diagonal unit. Plain and DCA segments."""
    from longctx.sparse import estimate

    local = 10
    monkeypatch.setattr(estimate, "LOCAL_DIAGONALS", local)
    monkeypatch.setattr(estimate, "SINK_COLUMNS", 5)
    bm, bn = blocks
    vsizes, ssizes = [35, 3, 64, 0], [110, 9, 1, 300]
    keys = randn(250, HKV, D, seed=7)
    seen = set()
    for dca, q_start in ((None, 170), (DCA, 100)):
        for seg_start, seg_end, parts in segments(q_start, 250, dca):
            rows = 6
            q_sel = randn(len(parts), rows, HQ, D, seed=seg_start + 11)
            est = seg_end - rows
            got = estimate_indices(
                q_sel, keys[:seg_end], parts, est, vsizes, ssizes, scale=SCALE,
                shared_budget=shared, unit="tile", blocks=blocks,
            )  # fmt: skip
            want = brute_scores(q_sel, keys, parts, est)
            seen.add(len(parts))
            for h in range(HQ):
                tiles = brute_tiles(want, parts, h, ssizes[h], bm, bn, shared, local)
                if shared and len(parts) > 1:
                    every = {j: x for pi in range(len(parts)) for j, x in want[pi][h][0].items()}
                    cols = brute_top(every, [j for j in sorted(every) if j < 5], vsizes[h])
                    got_cols = set()
                for pi, part in enumerate(parts):
                    mine = {int(c) for c in got[pi].vertical[h] if c != NO_COLUMN}
                    if shared and len(parts) > 1:
                        got_cols |= mine
                    else:
                        vert = want[pi][h][0]
                        sinks = [j for j in vert if j - part.key_lo < 5]
                        assert mine == brute_top(vert, sinks, vsizes[h]), (pi, h)
                    dists = {int(d) for d in got[pi].slash[h] if d != NO_SLASH}
                    assert dists == tiles[pi], (seg_start, pi, h, blocks)
                if shared and len(parts) > 1:
                    assert got_cols == cols, h
    assert seen == {1, 2, 3}
