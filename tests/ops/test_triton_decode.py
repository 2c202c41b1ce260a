"""paged_decode against the float64 reference of test_triton_prefill.py (interpreter on CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch

from longctx.ops.triton import DecodeConfig, flash_prefill, paged_decode
from longctx.ops.triton.paged_decode import decode_workspace
from tests.ops.test_triton_prefill import (
    DCA,
    THETA,
    assert_close,
    cached_keys,
    paged_kv,
    randn,
    reference,
)

pd = importlib.import_module("longctx.ops.triton.paged_decode")
SMALL = DecodeConfig(block_n=16, num_warps=4, num_stages=1)


def run_decode(
    q,
    ks,
    vs,
    *,
    page: int,
    partition_size: int,
    max_context: int | None = None,
    config: DecodeConfig = SMALL,
    **kw,
):
    """paged_decode with NaN-poisoned outputs and scratch; checks every partial is written."""
    kc, vc, table = paged_kv(ks, vs, page)
    ctx = torch.tensor([k.shape[0] for k in ks], dtype=torch.int64)
    max_context = max_context or table.shape[1] * page
    b, hq, d = q.shape
    parts = -(-max_context // partition_size)
    work = decode_workspace(b, hq, d, parts, q.device)
    for w in work:
        w.fill_(float("nan"))
    out, lse = torch.full_like(q, float("nan")), torch.full((hq, b), float("nan"))
    out, lse = paged_decode(
        q,
        kc,
        vc,
        table,
        ctx,
        partition_size=partition_size,
        max_context=max_context,
        config=config,
        out=out,
        lse=lse,
        workspace=work,
        **kw,
    )
    assert not torch.isnan(work[1]).any(), "a partition left its lse unwritten"
    empty = torch.arange(parts)[None, :] * partition_size >= ctx[:, None]  # [B, P]
    assert torch.isneginf(work[1][empty[:, None, :].expand_as(work[1])]).all()
    return out, lse


def reference_decode(q, ks, vs, **kw):
    """Each sequence's last position queries its whole context -> (out [B, Hq, D], lse [Hq, B])."""
    outs, lses = [], []
    for i, (k, v) in enumerate(zip(ks, vs)):
        n = k.shape[0]
        o, s = reference(q[i : i + 1], k, v, torch.tensor([n - 1]), **kw)
        outs.append(o)
        lses.append(s)
    return torch.cat(outs), torch.cat(lses, dim=1)


def make_batch(lens, hq, hkv, d, dtype, gen, dca=None, rope=False):
    q = randn(len(lens), hq, d, dtype=dtype, gen=gen)
    ks = [cached_keys(randn(n, hkv, d, dtype=dtype, gen=gen), dca, rope) for n in lens]
    vs = [randn(n, hkv, d, dtype=dtype, gen=gen) for n in lens]
    return q, ks, vs


def test_ragged_batch_gqa_partitions():
    """Contexts 1..300 over 64-key partitions, more partitions than any sequence needs."""
    gen = torch.Generator().manual_seed(10)
    lens = [1, 37, 100, 300]
    q, ks, vs = make_batch(lens, 4, 2, 64, torch.float32, gen)
    out, lse = run_decode(q, ks, vs, page=16, partition_size=64, max_context=400, scale=0.125)
    assert_close(out, lse, *reference_decode(q, ks, vs, scale=0.125), torch.float32)


def test_reduce_loops_over_partition_chunks(monkeypatch):
    """More partitions than the reduce merges per step (REDUCE_BLOCK_P, here 2)."""
    monkeypatch.setattr(pd, "REDUCE_BLOCK_P", 2)
    monkeypatch.setattr(pd, "_PLANS", {})  # launch plans are cached with the old block
    gen = torch.Generator().manual_seed(15)
    lens = [5, 150, 97]
    q, ks, vs = make_batch(lens, 4, 2, 64, torch.float32, gen)
    out, lse = run_decode(q, ks, vs, page=16, partition_size=32, scale=0.125)
    assert_close(out, lse, *reference_decode(q, ks, vs, scale=0.125), torch.float32)


def test_padding_slot_with_zero_context():
    gen = torch.Generator().manual_seed(11)
    q, ks, vs = make_batch([50, 70], 4, 2, 64, torch.float32, gen)
    kc, vc, table = paged_kv(ks, vs, 16)
    ctx = torch.tensor([50, 0])  # slot 1 is padding of a CUDA-graph bucket
    out, lse = paged_decode(q, kc, vc, table, ctx, scale=0.125, partition_size=32, config=SMALL)
    ref_out, ref_lse = reference_decode(q[:1], ks[:1], vs[:1], scale=0.125)
    assert_close(out[:1], lse[:, :1], ref_out, ref_lse, torch.float32)
    assert (out[1] == 0).all() and torch.isneginf(lse[:, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa7_rope_yarn_half_precision(dtype):
    """7 q heads per kv head (BLOCK_G padded to 16), head_dim 128, q rotated in the kernel."""
    gen = torch.Generator().manual_seed(12)
    lens = [90, 200]
    q, ks, vs = make_batch(lens, 7, 1, 128, dtype, gen, rope=True)
    kw = dict(scale=128**-0.5, yarn=64)
    out, lse = run_decode(
        q,
        ks,
        vs,
        page=32,
        partition_size=64,
        rope_theta=THETA,
        yarn_original_max=64,
        scale=kw["scale"],
    )
    assert out.dtype == dtype
    assert_close(out, lse, *reference_decode(q, ks, vs, rope=True, **kw), dtype)


@pytest.mark.parametrize(
    "dca,lens",
    [
        # c = 32: L-1 < c (intra only), n = 1 (+successive), n >= 2 (+inter), L = n c, L = n c + 1
        (DCA(48, 16), [20, 33, 64, 65, 97, 250]),
        # c = 18 < W: inter query at 2c - 1 < C
        (DCA(48, 30), [18, 19, 55, 160]),
    ],
    ids=["c32", "c18-wide-local"],
)
def test_dca_decode(dca, lens):
    gen = torch.Generator().manual_seed(13)
    q, ks, vs = make_batch(lens, 4, 2, 64, torch.float32, gen, dca=dca)
    out, lse = run_decode(
        q,
        ks,
        vs,
        page=16,
        partition_size=48,
        rope_theta=THETA,
        dca=dca,
        yarn_original_max=40,
        scale=0.125,
    )
    ref = reference_decode(q, ks, vs, scale=0.125, dca=dca, yarn=40)
    assert_close(out, lse, *ref, torch.float32)


def test_decode_matches_prefill_of_last_token():
    gen = torch.Generator().manual_seed(14)
    dca = DCA(48, 16)
    q, ks, vs = make_batch([150], 4, 2, 64, torch.float32, gen, dca=dca)
    kc, vc, table = paged_kv(ks, vs, 16)
    kw = dict(scale=0.125, rope_theta=THETA, dca=dca, yarn_original_max=40)
    out_d, lse_d = paged_decode(
        q, kc, vc, table, torch.tensor([150]), config=SMALL, partition_size=64, **kw
    )
    out_p, lse_p = flash_prefill(q, kc, vc, block_table=table[0], q_pos0=149, **kw)
    torch.testing.assert_close(out_d, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_d, lse_p, atol=1e-5, rtol=1e-5)


def test_rejects_bad_partition_size():
    q = torch.zeros(1, 2, 64)
    cache = torch.zeros(4, 16, 1, 64)
    table = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of block_n"):
        paged_decode(
            q, cache, cache, table, torch.tensor([10]), scale=1.0, partition_size=40, config=SMALL
        )


@pytest.mark.parametrize("batch,ctx", [(1, 32768), (1, 131072), (8, 131072), (1, 1 << 20)])
def test_partitions_fill_one_wave(batch, ctx):
    """Default partitions: every program resident at once (<= 2 per SM of the 132 assumed
    off-GPU), and enough of them to keep every SM busy."""
    size = pd.default_partition_size(ctx, batch, 4, torch.device("cpu"), 64, programs_per_sm=2)
    programs = -(-ctx // size) * batch * 4
    assert size % 64 == 0
    assert 132 < programs <= 2 * 132
