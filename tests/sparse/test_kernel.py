"""The Triton vertical-slash kernel (interpreter on the CPU) and its PyTorch reference against
float64 masked attention built from the same index: ragged segment lengths, GQA, a paged cache
with shuffled blocks and NaN in unused rows, segment starts off the block and page grid, no
vertical columns, the causal diagonal, the three DCA parts, bf16."""

from __future__ import annotations

import pytest
import torch

from longctx.ops.attention import reference_attention
from longctx.ops.triton.vs_sparse import SparseKernelConfig, vs_sparse_attention
from longctx.sparse.convert import convert_indices
from longctx.sparse.estimate import estimate_indices
from longctx.sparse.reference import index_masks, masked_reference, sparse_attention_reference
from tests.sparse.helpers import DCA, paged_cache, randn, segments

D, SCALE = 16, 0.25


def run_case(q_start, q_end, dca, hq, hkv, page, vsize, ssize, cfg, dtype=torch.float32):
    keys = randn(q_end, hkv, D, seed=1).to(dtype)
    values = randn(q_end, hkv, D, seed=2).to(dtype)
    k_cache, v_cache, table = paged_cache(keys, values, page, seed=3)
    for s0, s1, parts in segments(q_start, q_end, dca):
        q = randn(len(parts), s1 - s0, hq, D, seed=s0).to(dtype)
        rows = min(8, s1 - s0)
        sels = estimate_indices(
            q[:, -rows:], keys[:s1], parts, s1 - rows, [vsize] * hq, [ssize] * hq, scale=SCALE
        )
        index = convert_indices(sels, parts, s0, s1 - s0, block_m=cfg.block_m, block_n=cfg.block_n)
        want_out, want_lse = masked_reference(
            q, keys[:s1], values[:s1], index_masks(index, s1), scale=SCALE
        )
        got = vs_sparse_attention(q, k_cache, v_cache, table, index, scale=SCALE, config=cfg)
        ref = sparse_attention_reference(q, keys[:s1], values[:s1], index, scale=SCALE)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)
        for out, lse in (got, ref):
            torch.testing.assert_close(out.double(), want_out, **tol)
            torch.testing.assert_close(lse.double(), want_lse, **tol)


SMALL = SparseKernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
WIDE = SparseKernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
LARGE = SparseKernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


@pytest.mark.parametrize(
    "q_start,q_end,dca,hq,hkv,page,vsize,ssize,cfg",
    [
        (0, 77, None, 4, 2, 8, 6, 20, SMALL),  # first chunk: ragged, causal diagonal
        (61, 203, None, 6, 2, 16, 9, 40, WIDE),  # cached prefix, off-grid start, GQA 3
        (150, 250, DCA, 4, 2, 16, 5, 30, LARGE),  # three parts, inter over two chunks
        (101, 160, DCA, 2, 1, 8, 0, 25, WIDE),  # no vertical columns at all
    ],
)
def test_kernel_and_reference_match_float64(q_start, q_end, dca, hq, hkv, page, vsize, ssize, cfg):
    run_case(q_start, q_end, dca, hq, hkv, page, vsize, ssize, cfg)


def test_bf16():
    run_case(140, 180, DCA, 4, 2, 16, 6, 30, LARGE, dtype=torch.bfloat16)


def test_full_budget_equals_dense_attention():
    """Budgets covering every key: the kernel is plain causal attention."""
    keys, values = randn(150, 2, D, seed=4), randn(150, 2, D, seed=5)
    k_cache, v_cache, table = paged_cache(keys, values, 16, seed=6)
    ((s0, s1, parts),) = segments(40, 150, None)
    q = randn(1, s1 - s0, 4, D, seed=7)
    sels = estimate_indices(q[:, -8:], keys, parts, s1 - 8, [1000] * 4, [1000] * 4, scale=SCALE)
    index = convert_indices(sels, parts, s0, s1 - s0, block_m=32, block_n=32)
    out, lse = vs_sparse_attention(q, k_cache, v_cache, table, index, scale=SCALE, config=LARGE)
    mask = torch.arange(150)[None, :] <= torch.arange(s0, s1)[:, None]
    want_out, want_lse = reference_attention(q[0], keys, values, scale=SCALE, mask=mask)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)


def test_wrapper_checks_its_inputs():
    keys = randn(64, 2, D, seed=1)
    k_cache, v_cache, table = paged_cache(keys, keys, 16, seed=2)
    ((s0, s1, parts),) = segments(0, 64, None)
    q = randn(1, 64, 4, D, seed=3)
    sels = estimate_indices(q[:, -8:], keys, parts, 56, [4] * 4, [8] * 4, scale=SCALE)
    index = convert_indices(sels, parts, s0, 64, block_m=32, block_n=16)
    with pytest.raises(ValueError, match="blocks"):
        vs_sparse_attention(q, k_cache, v_cache, table, index, scale=SCALE, config=SMALL)
    with pytest.raises(ValueError, match="parts"):
        vs_sparse_attention(q[:, :10], k_cache, v_cache, table, index, scale=SCALE, config=WIDE)
