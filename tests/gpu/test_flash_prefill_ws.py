"""The Hopper (Gluon) prefill kernel against the float64 reference, through flash_prefill_varlen.

Runs on an sm_90 GPU only (tests/gpu is collected only with CUDA). Paged caches come from
tests/ops/test_triton_prefill.paged_kv: shuffled blocks, NaN in every slot no token wrote, so a
read of an unwritten key or value turns the output to NaN.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from longctx.ops.triton import flash_prefill_varlen
from longctx.ops.triton.flash_prefill import HostLayout
from tests.ops.test_triton_prefill import (
    DCA,
    THETA,
    assert_close,
    cached_keys,
    paged_kv,
    randn,
    reference,
)

ws = importlib.import_module("longctx.ops.triton.flash_prefill_ws")
pytestmark = pytest.mark.skipif(
    torch.cuda.get_device_capability() != (9, 0), reason="the Gluon kernel is sm_90 only"
)


def _i32(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device="cuda")


def _run(q, kc, vc, table, shapes, **kw):
    """shapes: (query tokens, cached length after the pass, first visible key) per sequence."""
    q, kc, vc = q.cuda(), kc.cuda(), vc.cuda()
    table = None if table is None else table.cuda()
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), device="cuda")
    paged = table is not None
    k4, v4 = (kc, vc) if paged else (kc[None], vc[None])  # contiguous keys: one page
    assert ws.supported(q, k4, v4, out, paged, False)
    cu = [0]
    for n, _, _ in shapes:
        cu.append(cu[-1] + n)
    flash_prefill_varlen(
        q,
        kc,
        vc,
        cu_seqlens_q=_i32(cu),
        max_seqlen_q=max(n for n, _, _ in shapes),
        q_pos0=_i32([c - n for n, c, _ in shapes]),
        k_start=_i32([s for _, _, s in shapes]),
        k_end=_i32([c for _, c, _ in shapes]),
        block_table=table,
        out=out,
        lse=lse,
        **kw,
    )
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize(
    "dtype,page",
    [(torch.bfloat16, 128), (torch.float16, 128), (torch.bfloat16, 64), (torch.bfloat16, 16)],
)
def test_varlen_chunks_gqa_rope_over_poisoned_pages(dtype, page):
    """Sequences straddling the 64-row warpgroup and 128-row program edges, a one-token
    chunk, a chunk starting mid-page, contexts ending mid-page (NaN tails), GQA 4:1; pages of
    16 and 64 keys make a 128-key tile of several TMA boxes (and the block table ends inside
    the last tile)."""
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d = 8, 2, 128
    shapes = [(1000, 1000, 0), (1, 1300, 0), (513, 1025, 0), (77, 4096, 0), (130, 257, 0)]
    ks = [cached_keys(randn(c, hkv, d, dtype=dtype, gen=gen), None, True) for _, c, _ in shapes]
    vs = [randn(c, hkv, d, dtype=dtype, gen=gen) for _, c, _ in shapes]
    qs = [randn(n, hq, d, dtype=dtype, gen=gen) for n, _, _ in shapes]
    kc, vc, table = paged_kv(ks, vs, page)
    table = table[:, : -(-max(c for _, c, _ in shapes) // page)].contiguous()  # no spare entries
    out, lse = _run(torch.cat(qs), kc, vc, table, shapes, scale=d**-0.5, rope_theta=THETA)
    refs = [
        reference(qi, ki, vi, torch.arange(c - n, c), scale=d**-0.5, rope=True)
        for qi, ki, vi, (n, c, _) in zip(qs, ks, vs, shapes)
    ]
    ref_out = torch.cat([r[0] for r in refs])
    ref_lse = torch.cat([r[1] for r in refs], dim=1)
    assert_close(out, lse, ref_out, ref_lse, dtype)


def test_key_ranges_head_dim_64_pages_256_and_rows_without_keys():
    """Non-causal key ranges [k_start, k_end) with unaligned starts, an empty range (out 0,
    lse -inf), head_dim 64, 256-token pages, no RoPE (queries used as given)."""
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d, dtype = 6, 3, 64, torch.bfloat16
    shapes = [(64, 700, 200), (129, 2000, 1000), (40, 300, 300)]
    ks = [randn(c, hkv, d, dtype=dtype, gen=gen) for _, c, _ in shapes]
    vs = [randn(c, hkv, d, dtype=dtype, gen=gen) for _, c, _ in shapes]
    qs = [randn(n, hq, d, dtype=dtype, gen=gen) for n, _, _ in shapes]
    kc, vc, table = paged_kv(ks, vs, 256)
    out, lse = _run(torch.cat(qs), kc, vc, table, shapes, scale=0.1, causal=False)
    refs = [
        reference(qi, ki, vi, torch.arange(c - n, c), scale=0.1, k_start=s, causal=False)
        for qi, ki, vi, (n, c, s) in zip(qs, ks, vs, shapes)
    ]
    ref_out = torch.cat([r[0] for r in refs])
    ref_lse = torch.cat([r[1] for r in refs], dim=1)
    assert torch.isinf(ref_lse[:, -40:]).all()
    assert_close(out, lse, ref_out, ref_lse, dtype)


def test_contiguous_keys_with_yarn():
    """A first chunk over fresh contiguous k/v; YaRN's f(p)^2 > 1 past original_max (moved
    onto the rotated queries by the pre-pass)."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, dtype, n = 4, 1, 128, torch.bfloat16, 900
    k = cached_keys(randn(n, hkv, d, dtype=dtype, gen=gen), None, True)
    v = randn(n, hkv, d, dtype=dtype, gen=gen)
    q = randn(n, hq, d, dtype=dtype, gen=gen)
    shapes = [(n, n, 0)]
    out, lse = _run(q, k, v, None, shapes, scale=d**-0.5, rope_theta=THETA, yarn_original_max=300)
    ref = reference(q, k, v, torch.arange(n), scale=d**-0.5, rope=True, yarn=300)
    assert_close(out, lse, *ref, dtype)


@pytest.mark.parametrize("dca", [DCA(300, 44), DCA(200, 90)], ids=["c256", "c110"])
def test_dca_parts_on_the_hopper_kernel(dca):
    """DCA past its first chunk: rows cut at chunk boundaries, three rotated query variants,
    one launch over (segment, part) key ranges, LSE merge; with the host layout given, as the
    engine's backend passes it. YaRN on (positions past original_max)."""
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d, dtype = 8, 2, 128, torch.bfloat16
    shapes = [(700, 1000, 0), (1, 777, 0), (300, 300, 0), (129, 2000, 0)]
    ks = [cached_keys(randn(c, hkv, d, dtype=dtype, gen=gen), dca, True) for _, c, _ in shapes]
    vs = [randn(c, hkv, d, dtype=dtype, gen=gen) for _, c, _ in shapes]
    qs = [randn(n, hq, d, dtype=dtype, gen=gen) for n, _, _ in shapes]
    kc, vc, table = paged_kv(ks, vs, 128)
    host = HostLayout(
        tuple(n for n, _, _ in shapes),
        tuple(c - n for n, c, _ in shapes),
        (0,) * len(shapes),
        tuple(c for _, c, _ in shapes),
    )
    kw = dict(scale=d**-0.5, rope_theta=THETA, dca=dca, yarn_original_max=500, host=host)
    out, lse = _run(torch.cat(qs), kc, vc, table, shapes, **kw)
    refs = [
        reference(qi, ki, vi, torch.arange(c - n, c), scale=d**-0.5, dca=dca, yarn=500)
        for qi, ki, vi, (n, c, _) in zip(qs, ks, vs, shapes)
    ]
    ref_out = torch.cat([r[0] for r in refs])
    ref_lse = torch.cat([r[1] for r in refs], dim=1)
    assert_close(out, lse, ref_out, ref_lse, dtype)
