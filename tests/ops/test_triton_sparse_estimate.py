"""The Triton estimation scores (longctx/ops/triton/sparse_estimate.py) under the interpreter:
against float64 loops and against the PyTorch part_scores, for plain causal segments and DCA
segments of one, two and three parts (inter folded over one and two chunks), estimation row
counts that are not powers of two (1, 6, 20), tiles ending inside a part or straddling a fold
period, heads in several groups, GQA; the selections it leads to equal the PyTorch path's."""

from __future__ import annotations

import pytest
import torch

from longctx.ops.triton.sparse_estimate import part_scores_triton
from longctx.sparse.estimate import estimate_indices, part_scores
from tests.sparse.helpers import DCA, randn, segments
from tests.sparse.test_estimate import HKV, HQ, SCALE, D, brute_scores

CASES = [
    (100, 190, None, 8, 32),
    (150, 250, DCA, 6, 32),
    (130, 250, DCA, 20, 128),
    (60, 250, DCA, 1, 16),
]


@pytest.mark.parametrize("q_start,q_end,dca,rows,block_n", CASES)
def test_scores_match_part_scores(q_start, q_end, dca, rows, block_n):
    keys = randn(q_end, HKV, D, seed=1)
    seen = set()
    for seg_start, seg_end, parts in segments(q_start, q_end, dca):
        q_sel = randn(len(parts), rows, HQ, D, seed=seg_start)
        est = seg_end - rows
        want = part_scores(q_sel, keys[:seg_end], parts, est, scale=SCALE)
        got = part_scores_triton(
            q_sel, keys[:seg_end], parts, est, scale=SCALE, block_n=block_n, max_elements=1
        )
        for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        seen.add(len(parts))
    assert seen == ({1} if dca is None else {1, 2, 3} if q_start < 64 else {3})


def test_scores_match_float64_loops():
    (_, seg_end, parts), *_ = segments(200, 250, DCA)  # three parts, inter folded twice
    keys = randn(seg_end, HKV, D, seed=2)
    q_sel = randn(len(parts), 5, HQ, D, seed=3)
    est = seg_end - 5
    vert, slash = part_scores_triton(q_sel, keys, parts, est, scale=SCALE, block_n=16)
    want = brute_scores(q_sel, keys, parts, est)
    for pi, part in enumerate(parts):
        first = est - part.key_lo + part.q_shift - part.diagonal_width + 1
        for h in range(HQ):
            v, s = want[pi][h]
            for j, x in v.items():
                assert abs(vert[pi][h, j - part.key_lo].item() - x) < 1e-5
            for dist, x in s.items():
                assert abs(slash[pi][h, dist - first].item() - x) < 1e-5


def test_selections_match_the_pytorch_path():
    keys = randn(250, HKV, D, seed=4)
    for seg_start, seg_end, parts in segments(130, 250, DCA):
        q_sel = randn(len(parts), 8, HQ, D, seed=seg_start + 9)
        args = (q_sel, keys[:seg_end], parts, seg_end - 8, [40, 3, 64, 9], [90, 7, 0, 140])
        for shared in (True, False):
            a = estimate_indices(*args, scale=SCALE, shared_budget=shared, kernel=True)
            b = estimate_indices(*args, scale=SCALE, shared_budget=shared)
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x.vertical.sort(1).values, y.vertical.sort(1).values)
                assert torch.equal(x.slash.sort(1).values, y.slash.sort(1).values)
