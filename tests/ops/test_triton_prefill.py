"""flash_prefill against a float64 brute-force reference (runs under TRITON_INTERPRET=1 on CPU).

The reference builds, per (query, key), the DCA part (or plain causal / range visibility),
rotates queries and keys in float64 at explicit positions, and takes a masked softmax.
Helpers here are shared with test_triton_decode.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from longctx.ops.triton import KernelConfig, flash_prefill, flash_prefill_varlen

THETA = 10000.0
SMALL = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)  # many tiles at small L
TINY_N = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
SMALL_TMA = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, tma=True)
fp = importlib.import_module("longctx.ops.triton.flash_prefill")
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class DCA:
    chunk_size: int
    local_size: int

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size


# ------------------------------------------------------------------------------------------------
# float64 reference
# ------------------------------------------------------------------------------------------------


def rope64(x: torch.Tensor, pos: torch.Tensor, theta: float = THETA) -> torch.Tensor:
    """Rotate-half RoPE in float64: x [L, H, D], integer positions pos [L]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def yarn_mult(pos: torch.Tensor, original_max: int | None) -> torch.Tensor:
    if not original_max:
        return torch.ones(pos.shape, dtype=torch.float64)
    f = (0.1 * torch.log((pos.double() + 1) / original_max) + 1).clamp(min=1.0)
    return f * f


def visibility(
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    *,
    k_start: int,
    k_end: int,
    causal: bool,
    dca: DCA | None,
) -> torch.Tensor:
    """part index [Lq, Lk]: -1 hidden; dense 0; DCA 0 inter, 1 successive, 2 intra."""
    p, j = qpos[:, None], kpos[None, :]
    seen = (j >= k_start) & (j < k_end) & (p >= 0)
    if causal or dca is not None:
        seen &= j <= p
    if dca is None:
        part = torch.zeros_like(p + j)
    else:
        diff = p // dca.chunk_len - j // dca.chunk_len
        part = torch.where(diff == 0, 2, torch.where(diff == 1, 1, 0))
    return torch.where(seen, part, -1)


def dca_query_positions(qpos: torch.Tensor, dca: DCA) -> list[torch.Tensor]:
    c, big = dca.chunk_len, dca.chunk_size
    inter = torch.full_like(qpos, min(2 * c - 1, big))
    return [inter, torch.clamp(qpos % c + c, max=big), qpos % c]


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    *,
    scale: float,
    k_start: int = 0,
    k_end: int | None = None,
    causal: bool = True,
    rope: bool = False,
    dca: DCA | None = None,
    yarn: int | None = None,
):
    """q [Lq, Hq, D] (unrotated if rope/dca), k/v [Lk, Hkv, D] as cached (rotated), keys at
    positions 0..Lk-1 -> (out [Lq, Hq, D] float64, lse [Hq, Lq] float64)."""
    lk = k.shape[0]
    kpos = torch.arange(lk)
    part = visibility(
        qpos, kpos, k_start=k_start, k_end=lk if k_end is None else k_end, causal=causal, dca=dca
    )
    if dca is not None:
        qs = [rope64(q, p) for p in dca_query_positions(qpos, dca)]
    else:
        qs = [rope64(q, qpos) if rope else q.double()]
    g = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(g, 1).transpose(0, 1)  # [H, Lk, D]
    vd = v.double().repeat_interleave(g, 1).transpose(0, 1)
    logits = torch.stack([qi.transpose(0, 1) @ kd.transpose(1, 2) for qi in qs])  # [P, H, Lq, Lk]
    s = logits.gather(0, part.clamp(min=0).expand(1, logits.shape[1], -1, -1))[0]
    s = s * (scale * yarn_mult(qpos, yarn))[None, :, None]
    s = s.masked_fill(part[None] < 0, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    w = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return (w @ vd).transpose(0, 1), lse


def cached_keys(k_raw: torch.Tensor, dca: DCA | None, rope: bool) -> torch.Tensor:
    """What the engine caches: keys rotated at p (or p mod c under DCA), in k_raw's dtype."""
    pos = torch.arange(k_raw.shape[0])
    if dca is not None:
        return rope64(k_raw, pos % dca.chunk_len).to(k_raw.dtype)
    return rope64(k_raw, pos).to(k_raw.dtype) if rope else k_raw


# ------------------------------------------------------------------------------------------------
# paged cache with holes, shuffled blocks and NaN poison
# ------------------------------------------------------------------------------------------------


def paged_kv(
    ks: list[torch.Tensor], vs: list[torch.Tensor], page: int, seed: int = 0, spare: int = 3
):
    """Scatter each sequence's k/v [L, Hkv, D] into shuffled blocks of one paged cache.

    Unused blocks and the unused tail of each last block hold NaN, so a kernel reading a
    key it should not see produces NaN. Returns (k_cache, v_cache, block_table [B, width]);
    padding entries of the table point at a NaN block.
    """
    need = [-(-k.shape[0] // page) for k in ks]
    total = sum(need) + spare
    h, d = ks[0].shape[1:]
    caches = [torch.full((total, page, h, d), float("nan"), dtype=ks[0].dtype) for _ in range(2)]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    width = max(need) + 2
    table = torch.full((len(ks), width), order[-1], dtype=torch.int64)  # order[-1]: never used
    used = 0
    for i, n in enumerate(need):
        blocks = order[used : used + n]
        used += n
        table[i, :n] = torch.tensor(blocks)
        for cache, x in zip(caches, (ks[i], vs[i])):
            for b, blk in enumerate(blocks):
                rows = x[b * page : (b + 1) * page]
                cache[blk, : rows.shape[0]] = rows
    return caches[0], caches[1], table


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def assert_close(out, lse, ref_out, ref_lse, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    assert not torch.isnan(lse).any(), "unwritten (NaN) lse elements"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "empty-row pattern of lse differs"
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


def run_single(q, k, v, *, page: int | None, gen, q_pos0: int, scale: float, **kw):
    """flash_prefill on poisoned outputs, paged (page given) or contiguous."""
    out, lse = nan_like(q), torch.full((q.shape[1], q.shape[0]), float("nan"))
    if page is None:
        return flash_prefill(q, k, v, scale=scale, q_pos0=q_pos0, out=out, lse=lse, **kw)
    kc, vc, table = paged_kv([k], [v], page)
    return flash_prefill(
        q, kc, vc, block_table=table[0], scale=scale, q_pos0=q_pos0, out=out, lse=lse, **kw
    )


# ------------------------------------------------------------------------------------------------
# dense
# ------------------------------------------------------------------------------------------------


def test_dense_causal_contiguous():
    gen = torch.Generator().manual_seed(0)
    lq, hq, hkv, d = 200, 4, 2, 64
    q, k, v = (randn(lq, h, d, dtype=torch.float32, gen=gen) for h in (hq, hkv, hkv))
    out, lse = run_single(q, k, v, page=None, gen=gen, q_pos0=0, scale=d**-0.5)
    ref = reference(q, k, v, torch.arange(lq), scale=d**-0.5)
    assert_close(out, lse, *ref, torch.float32)


@pytest.mark.parametrize(
    "page,heads,config",
    [(16, (4, 2), SMALL), (64, (7, 1), SMALL), (32, (4, 2), TINY_N)],
    ids=["per-key-blocks", "tile-in-block-gqa7", "block-multiple-of-tile"],
)
def test_dense_paged_chunk(page, heads, config):
    """A later prefill chunk: queries 190..299 over the 300 cached keys, block table shuffled."""
    gen = torch.Generator().manual_seed(1)
    ctx, lq, d = 300, 110, 64
    (hq, hkv) = heads
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k, v = (randn(ctx, hkv, d, dtype=torch.float32, gen=gen) for _ in range(2))
    out, lse = run_single(q, k, v, page=page, gen=gen, q_pos0=ctx - lq, scale=0.1, config=config)
    ref = reference(q, k, v, torch.arange(ctx - lq, ctx), scale=0.1)
    assert_close(out, lse, *ref, torch.float32)


def test_key_range_noncausal_and_rows_without_keys():
    gen = torch.Generator().manual_seed(2)
    lq, lk, hq, hkv, d = 70, 240, 4, 2, 64
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k, v = (randn(lk, hkv, d, dtype=torch.float32, gen=gen) for _ in range(2))
    qpos = torch.arange(100, 100 + lq)
    out, lse = run_single(
        q,
        k,
        v,
        page=16,
        gen=gen,
        q_pos0=100,
        scale=0.125,
        k_start=37,
        k_end=211,
        causal=False,
        config=SMALL,
    )
    ref = reference(q, k, v, qpos, scale=0.125, k_start=37, k_end=211, causal=False)
    assert_close(out, lse, *ref, torch.float32)
    # causal with k_start past the first queries: those rows see nothing
    out, lse = run_single(
        q, k, v, page=16, gen=gen, q_pos0=0, scale=0.125, k_start=40, k_end=lq, config=SMALL
    )
    ref = reference(q, k, v, torch.arange(lq), scale=0.125, k_start=40, k_end=lq)
    assert_close(out, lse, *ref, torch.float32)
    assert torch.isinf(lse[:, :40]).all() and (out[:40] == 0).all()


def test_empty_key_range():
    gen = torch.Generator().manual_seed(3)
    q = randn(20, 4, 64, dtype=torch.float32, gen=gen)
    k, v = (randn(64, 2, 64, dtype=torch.float32, gen=gen) for _ in range(2))
    out, lse = run_single(
        q, k, v, page=16, gen=gen, q_pos0=44, scale=0.1, k_start=30, k_end=30, causal=False
    )
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_varlen_batch_with_rope():
    """Three sequences in one launch: a first chunk, a one-token chunk, a later chunk."""
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d, page = 4, 2, 64, 16
    shapes = [(50, 50), (1, 130), (77, 200)]  # (query tokens, context after this pass)
    ks = [
        cached_keys(randn(c, hkv, d, dtype=torch.float32, gen=gen), None, True) for _, c in shapes
    ]
    vs = [randn(c, hkv, d, dtype=torch.float32, gen=gen) for _, c in shapes]
    qs = [randn(n, hq, d, dtype=torch.float32, gen=gen) for n, _ in shapes]
    kc, vc, table = paged_kv(ks, vs, page)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
    q = torch.cat(qs)
    out, lse = flash_prefill_varlen(
        q,
        kc,
        vc,
        scale=d**-0.5,
        cu_seqlens_q=i32([0, 50, 51, 128]),
        max_seqlen_q=77,
        q_pos0=i32([c - n for n, c in shapes]),
        k_end=i32([c for _, c in shapes]),
        block_table=table,
        rope_theta=THETA,
        config=SMALL,
        out=nan_like(q),
        lse=torch.full((hq, q.shape[0]), float("nan")),
    )
    refs = [
        reference(qi, ki, vi, torch.arange(c - n, c), scale=d**-0.5, rope=True)
        for qi, ki, vi, (n, c) in zip(qs, ks, vs, shapes)
    ]
    ref_out = torch.cat([r[0] for r in refs])
    ref_lse = torch.cat([r[1] for r in refs], dim=1)
    assert_close(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rope_yarn(dtype):
    """head_dim 128 (fp16) and bf16 (upcast loads under the interpreter), RoPE + YaRN."""
    gen = torch.Generator().manual_seed(5)
    d = 128 if dtype == torch.float16 else 64
    ctx, lq, hq, hkv = 160, 96, 2, 1
    q = randn(lq, hq, d, dtype=dtype, gen=gen)
    k = cached_keys(randn(ctx, hkv, d, dtype=dtype, gen=gen), None, True)
    v = randn(ctx, hkv, d, dtype=dtype, gen=gen)
    out, lse = run_single(
        q,
        k,
        v,
        page=64,
        gen=gen,
        q_pos0=ctx - lq,
        scale=d**-0.5,
        rope_theta=THETA,
        yarn_original_max=40,
    )
    ref = reference(q, k, v, torch.arange(ctx - lq, ctx), scale=d**-0.5, rope=True, yarn=40)
    assert out.dtype == dtype
    assert_close(out, lse, *ref, dtype)


@pytest.mark.parametrize(
    "page,dtype",
    [(64, torch.float32), (32, torch.float16), (None, torch.float32)],
    ids=["paged64-fp32", "paged32-fp16", "contiguous"],
)
def test_tensor_descriptor_tiles(page, dtype):
    """Unmasked runs through TMA descriptors (rows page * PAGE_SIZE + offset of the 2-d
    cache view); masked edges keep pointer loads over the NaN-poisoned cache."""
    gen = torch.Generator().manual_seed(16)
    ctx, lq, hq, hkv, d = 300, 150, 4, 2, 64
    q = randn(lq, hq, d, dtype=dtype, gen=gen)
    k = cached_keys(randn(ctx, hkv, d, dtype=dtype, gen=gen), None, True)
    v = randn(ctx, hkv, d, dtype=dtype, gen=gen)
    kw = dict(gen=gen, q_pos0=ctx - lq, scale=d**-0.5, rope_theta=THETA, config=SMALL_TMA)
    out, lse = run_single(q, k, v, page=page, **kw)
    ref = reference(q, k, v, torch.arange(ctx - lq, ctx), scale=d**-0.5, rope=True)
    assert_close(out, lse, *ref, dtype)
    kc, vc, _ = paged_kv([k], [v], page or ctx)
    paged = page is not None
    descs = fp._kv_descriptors(kc if paged else k[None], vc if paged else v[None], paged, SMALL_TMA)
    assert descs[0] is not None, "the descriptor path was not taken"


def test_tensor_descriptors_fall_back_when_pages_split_tiles():
    k = torch.zeros(4, 16, 2, 64)
    assert fp._kv_descriptors(k, k, True, SMALL_TMA) == (None, None)  # page 16 < block_n 32


# ------------------------------------------------------------------------------------------------
# DCA
# ------------------------------------------------------------------------------------------------


def test_dca_with_chunk_covering_everything_is_causal_attention():
    """C >= sequence length: DCA is exactly ordinary causal attention (DESIGN.md section 2)."""
    gen = torch.Generator().manual_seed(6)
    lq, hq, hkv, d = 150, 4, 2, 64
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k = cached_keys(randn(lq, hkv, d, dtype=torch.float32, gen=gen), None, True)
    v = randn(lq, hkv, d, dtype=torch.float32, gen=gen)
    dca = DCA(chunk_size=1024, local_size=128)
    kw = dict(page=None, gen=gen, q_pos0=0, scale=d**-0.5, rope_theta=THETA, yarn_original_max=64)
    out_dca, lse_dca = run_single(q, k, v, dca=dca, **kw)
    out_dense, lse_dense = run_single(q, k, v, **kw)
    torch.testing.assert_close(out_dca, out_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_dca, lse_dense, atol=1e-5, rtol=1e-5)
    ref = reference(q, k, v, torch.arange(lq), scale=d**-0.5, rope=True, yarn=64)
    assert_close(out_dca, lse_dca, *ref, torch.float32)


@pytest.mark.parametrize(
    "dca,ctx,lq,config,dtype",
    [
        (DCA(48, 16), 200, 110, TINY_N, torch.float32),  # c=32, chunk edges inside tiles
        (DCA(80, 16), 256, 256, SMALL, torch.float32),  # c=64, edges on tile boundaries
        # c=25 < BLOCK_M: blocks straddle chunks; W > c: inter at 2c-1 < C
        (DCA(60, 35), 180, 67, SMALL, torch.float16),
    ],
    ids=["c32-chunk", "c64-aligned-full", "c25-wide-local-fp16"],
)
def test_dca_three_parts(dca, ctx, lq, config, dtype):
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d = 4, 2, 64
    q = randn(lq, hq, d, dtype=dtype, gen=gen)
    k = cached_keys(randn(ctx, hkv, d, dtype=dtype, gen=gen), dca, True)
    v = randn(ctx, hkv, d, dtype=dtype, gen=gen)
    out, lse = run_single(
        q,
        k,
        v,
        page=16,
        gen=gen,
        q_pos0=ctx - lq,
        scale=d**-0.5,
        rope_theta=THETA,
        dca=dca,
        yarn_original_max=50,
        config=config,
    )
    ref = reference(q, k, v, torch.arange(ctx - lq, ctx), scale=d**-0.5, dca=dca, yarn=50)
    assert_close(out, lse, *ref, dtype)


def test_dca_part_ranges_can_be_clipped():
    """k_start/k_end clip every DCA part (e.g. a caller splitting keys into two launches)."""
    gen = torch.Generator().manual_seed(8)
    dca = DCA(40, 8)  # c = 32
    ctx, lq, hq, hkv, d = 160, 40, 2, 1, 64
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k = cached_keys(randn(ctx, hkv, d, dtype=torch.float32, gen=gen), dca, True)
    v = randn(ctx, hkv, d, dtype=torch.float32, gen=gen)
    halves = [
        run_single(
            q,
            k,
            v,
            page=16,
            gen=gen,
            q_pos0=ctx - lq,
            scale=0.125,
            rope_theta=THETA,
            dca=dca,
            k_start=a,
            k_end=b,
            config=SMALL,
        )
        for a, b in ((0, 50), (50, ctx))
    ]
    lse = torch.logaddexp(halves[0][1], halves[1][1])
    w = [torch.exp(h[1] - lse).T[..., None] for h in halves]
    out = w[0] * halves[0][0] + w[1] * halves[1][0]
    ref = reference(q, k, v, torch.arange(ctx - lq, ctx), scale=0.125, dca=dca)
    assert_close(out, lse, *ref, torch.float32)


def test_rejects_bad_inputs():
    q = torch.zeros(4, 3, 64)
    k = torch.zeros(8, 2, 64)
    with pytest.raises(ValueError, match="head layout"):
        flash_prefill(q, k, k, scale=1.0)
    with pytest.raises(ValueError, match="rope_theta"):
        flash_prefill(torch.zeros(4, 2, 64), k, k, scale=1.0, dca=DCA(8, 2))
    with pytest.raises(ValueError, match="exceeds"):
        flash_prefill(torch.zeros(4, 2, 64), k, k, scale=1.0, k_end=9)


def test_rotate_queries_prepass_matches_rope():
    """The Hopper kernel's pre-pass: out = RoPE(q) at each row's absolute position over a
    ragged varlen batch (angles as the float32 product pos * inv_freq, the engine's
    convention in layers/rotary.py)."""
    gen = torch.Generator().manual_seed(11)
    q_lens, q_pos0 = [37, 5, 70], [0, 900, 3000]
    q = torch.randn(sum(q_lens), 3, 64, generator=gen)
    cu = torch.tensor([0, 37, 42, 112], dtype=torch.int32)
    var = fp.make_variant(64, q.device, THETA, None, None)
    out = torch.full_like(q, float("nan"))
    fp.rotate_queries(q, out, cu, torch.tensor(q_pos0, dtype=torch.int32), max(q_lens), var)
    pos = torch.cat([torch.arange(n) + p0 for n, p0 in zip(q_lens, q_pos0)])
    inv = 1.0 / (THETA ** (torch.arange(0, 64, 2).float() / 64))
    ang = (pos.float()[:, None] * inv).double()
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    q1, q2 = q.double()[..., :32], q.double()[..., 32:]
    expected = torch.cat((q1 * cos - q2 * sin, q2 * cos + q1 * sin), -1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_rotate_queries_dca_parts():
    """With DCA the pre-pass writes the inter / successive / intra rotations [3, T, Hq, D]."""
    gen = torch.Generator().manual_seed(12)
    dca, q_lens, q_pos0 = DCA(48, 16), [40, 9], [0, 70]
    q = torch.randn(sum(q_lens), 2, 32, generator=gen)
    var = fp.make_variant(32, q.device, THETA, dca, None)
    out = torch.full((3, *q.shape), float("nan"))
    cu = torch.tensor([0, 40, 49], dtype=torch.int32)
    fp.rotate_queries(q, out, cu, torch.tensor(q_pos0, dtype=torch.int32), 40, var)
    pos = torch.cat([torch.arange(n) + p0 for n, p0 in zip(q_lens, q_pos0)])
    for part, rot in enumerate(dca_query_positions(pos, dca)):
        torch.testing.assert_close(out[part].double(), rope64(q, rot), atol=2e-5, rtol=2e-5)


def test_merge_parts_kernel_matches_merge_attention():
    """Log-sum-exp merge with a part without keys on some rows and rows without any keys."""
    from longctx.ops.attention import merge_attention

    gen = torch.Generator().manual_seed(13)
    t, hq, d = 37, 3, 64
    parts = torch.randn(3, t, hq, d, generator=gen)
    lse = torch.randn(hq, 3 * t, generator=gen) * 3
    lse[:, t : t + 10] = float("-inf")  # part 1 empty on rows 0-9
    for part in range(3):
        lse[:, part * t + 30 : part * t + 33] = float("-inf")  # rows 30-32: no keys at all
    out, out_lse = torch.full((t, hq, d), float("nan")), torch.full((hq, t), float("nan"))
    fp.merge_parts(parts, lse, out, out_lse)
    ref = merge_attention([(parts[p], lse[:, p * t : (p + 1) * t]) for p in range(3)])
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_lse, ref[1])
    assert (out[30:33] == 0).all()


@pytest.mark.parametrize("dca", [DCA(48, 16), DCA(60, 35)], ids=["c32", "c25-wide-local"])
def test_dca_as_key_ranges_equals_dca(monkeypatch, dca):
    """The Hopper path's decomposition of DCA (rows cut at chunk boundaries, per part a plain
    key range with pre-rotated queries, one varlen launch, LSE merge), run here with the
    Triton kernel standing in for the Gluon one, equals the float64 DCA reference: chunks
    spanning several DCA chunks, a one-token chunk, a sequence inside its first chunk."""
    gen = torch.Generator().manual_seed(14)
    hq, hkv, d, page = 4, 2, 32, 16
    shapes = [(110, 200), (1, 131), (20, 20)]  # (query tokens, context after this pass)
    ks = [cached_keys(torch.randn(c, hkv, d, generator=gen), dca, True) for _, c in shapes]
    vs = [torch.randn(c, hkv, d, generator=gen) for _, c in shapes]
    qs = [torch.randn(n, hq, d, generator=gen) for n, _ in shapes]
    kc, vc, table = paged_kv(ks, vs, page)

    def triton_instead(
        q, k, v, out, lse, *, qk_scale_log2, block_table, causal, yarn_inv_orig, **kw
    ):
        assert yarn_inv_orig == 0.0
        fp.flash_prefill_varlen(
            q,
            k,
            v,
            scale=qk_scale_log2 / fp.LOG2E,
            block_table=block_table,
            causal=causal,
            config=SMALL,
            out=out,
            lse=lse,
            **kw,
        )

    monkeypatch.setattr(fp.ws, "flash_prefill_ws", triton_instead)
    q = torch.cat(qs)
    out, lse = nan_like(q), torch.full((hq, q.shape[0]), float("nan"))
    host = fp.HostLayout(
        tuple(n for n, _ in shapes),
        tuple(c - n for n, c in shapes),
        (0, 0, 0),
        tuple(c for _, c in shapes),
    )
    var = fp.make_variant(d, q.device, THETA, dca, None)
    fp._dca_prefill_hopper(q, kc, vc, out, lse, d**-0.5, table, host, var)
    refs = [
        reference(qi, ki, vi, torch.arange(c - n, c), scale=d**-0.5, dca=dca)
        for qi, ki, vi, (n, c) in zip(qs, ks, vs, shapes)
    ]
    assert_close(
        out, lse, torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs], 1), torch.float32
    )
