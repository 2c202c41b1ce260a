"""The Triton kernels over an fp8 (e4m3 + per token/head scales) KV cache, interpreter on CPU.

Each kernel is compared with the float64 reference of test_triton_prefill.py computed on the
DEQUANTIZED cache (stored * scale): the difference is kernel error only, so the fp32
tolerance applies. A second, looser comparison with the reference on the unquantized values
documents the quantization error itself (random N(0, 1) keys/values, d = 64).

Keys carry Qwen2-like outlier channels (a few channels per kv head offset by +-40..60, the
size of layer 0's k bias in the default model), and the cache stores them relative to a zero
point near those offsets (kv_quant.py): the kernels must add q . zero back.

Caches: shuffled blocks as in the other kernel tests; unused rows hold the fp8 NaN code and
their scales NaN, so a read of a row the kernel should not see turns the output NaN (the
interpreter reads the e4m3 NaN code as 480, hence the poisoned scales).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from longctx.layers.attention.kv_quant import FP8_DTYPE, dequantize_fp8, quantize_fp8
from longctx.ops.triton import DecodeConfig, flash_prefill, flash_prefill_varlen, paged_decode
from longctx.ops.triton.paged_decode import decode_workspace
from tests.ops.test_triton_decode import reference_decode
from tests.ops.test_triton_prefill import (
    DCA,
    SMALL,
    THETA,
    TINY_N,
    assert_close,
    cached_keys,
    nan_like,
    paged_kv,
    randn,
    reference,
)

fp = importlib.import_module("longctx.ops.triton.flash_prefill")
DECODE_SMALL = DecodeConfig(block_n=16, num_warps=4, num_stages=1)
# Quantization error against the unquantized reference: measured worst cases over the tests
# below, max |out - ref| 0.099 and max |lse - ref| 0.066 (N(0, 1) inputs, d = 64; e4m3 keeps
# 3 mantissa bits); a wrong scale gives errors of order 1.
QUANT_TOL = 0.12


def quantized(xs: list[torch.Tensor], zero: torch.Tensor | None = None):
    """Per sequence: (fp8 values, scales [L, Hkv], dequantized float64), relative to zero."""
    out = []
    for x in xs:
        xq, s = quantize_fp8(x, zero)
        out.append((xq, s, dequantize_fp8(xq, s, torch.float64, zero)))
    return out


def outlier_offsets(hkv: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [Hkv, D] with 4 outlier channels per head, a zero point near them): the zero
    point is the offsets plus N(0, 0.3^2) noise, as a calibrated mean would be."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(hkv, d)
    for h in range(hkv):
        chans = torch.randperm(d, generator=gen)[:4]
        signs = torch.randint(0, 2, (4,), generator=gen) * 2 - 1
        offsets[h, chans] = signs * (40 + 20 * torch.rand(4, generator=gen))
    return offsets, offsets + 0.3 * torch.randn(hkv, d, generator=gen)


def fp8_paged(
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    page: int,
    seed: int = 0,
    zero: torch.Tensor | None = None,
):
    """Quantize each sequence's k/v (keys relative to zero) and scatter values and scales into
    one shuffled paged cache (same block table for both). Returns (k_cache, v_cache, k_scale,
    v_scale, table, dequantized ks, dequantized vs)."""
    kq, vq = quantized(ks, zero), quantized(vs)
    kc, vc, table = paged_kv([x[0].float() for x in kq], [x[0].float() for x in vq], page, seed)
    ksc, vsc, table2 = paged_kv(
        [x[1][..., None] for x in kq], [x[1][..., None] for x in vq], page, seed
    )
    assert torch.equal(table, table2)
    return (
        kc.to(FP8_DTYPE),
        vc.to(FP8_DTYPE),
        ksc[..., 0].contiguous(),
        vsc[..., 0].contiguous(),
        table,
        [x[2] for x in kq],
        [x[2] for x in vq],
    )


def assert_quantization_error(out, lse, ref_out, ref_lse) -> None:
    finite = torch.isfinite(ref_lse)
    assert (out.double() - ref_out).abs().max() < QUANT_TOL
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < QUANT_TOL


# ------------------------------------------------------------------------------------------------
# prefill
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_varlen_gqa_rope(dtype):
    """Three sequences in one launch (a first chunk, a one-token chunk, a later chunk), 4 q
    heads per kv head, keys rotated in the cache, q rotated in the kernel."""
    gen = torch.Generator().manual_seed(40)
    hq, hkv, d, page = 8, 2, 64, 16
    shapes = [(50, 50), (1, 130), (77, 200)]  # (query tokens, context after this pass)
    offsets, zero = outlier_offsets(hkv, d, seed=1)
    ks = [
        cached_keys(randn(c, hkv, d, dtype=torch.float32, gen=gen), None, True) + offsets
        for _, c in shapes
    ]
    vs = [randn(c, hkv, d, dtype=torch.float32, gen=gen) for _, c in shapes]
    qs = [randn(n, hq, d, dtype=dtype, gen=gen) for n, _ in shapes]
    kc, vc, ksc, vsc, table, kd, vd = fp8_paged(ks, vs, page, zero=zero)
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
        k_scale=ksc,
        v_scale=vsc,
        k_zero=zero,
    )
    assert out.dtype == dtype

    def refs(keys, values):
        rs = [
            reference(qi, ki, vi, torch.arange(c - n, c), scale=d**-0.5, rope=True)
            for qi, ki, vi, (n, c) in zip(qs, keys, values, shapes)
        ]
        return torch.cat([r[0] for r in rs]), torch.cat([r[1] for r in rs], dim=1)

    assert_close(out, lse, *refs(kd, vd), dtype)
    assert_quantization_error(out, lse, *refs(ks, vs))


@pytest.mark.parametrize(
    "dca,ctx,lq,config,dtype,outliers",
    [
        (DCA(48, 16), 200, 110, TINY_N, torch.float32, True),  # c=32, chunk edges inside tiles
        (DCA(60, 35), 180, 67, SMALL, torch.float16, False),  # c=25 < BLOCK_M, W > c
    ],
    ids=["c32-chunk", "c25-wide-local-fp16"],
)
def test_prefill_dca_three_parts(dca, ctx, lq, config, dtype, outliers):
    """fp16 queries without outliers: the kernel rounds each rotated query to fp16, and with
    outlier keys (|q . k| in the hundreds) that alone moves the LSE by ~1e-2, more than the
    fp16 tolerance, for a reason that is not the cache's."""
    gen = torch.Generator().manual_seed(41)
    hq, hkv, d = 4, 2, 64
    q = randn(lq, hq, d, dtype=dtype, gen=gen)
    offsets, zero = outlier_offsets(hkv, d, seed=2)
    if not outliers:
        offsets, zero = 0.0, None
    k = cached_keys(randn(ctx, hkv, d, dtype=torch.float32, gen=gen), dca, True) + offsets
    v = randn(ctx, hkv, d, dtype=torch.float32, gen=gen)
    kc, vc, ksc, vsc, table, (kd,), (vd,) = fp8_paged([k], [v], 16, zero=zero)
    out, lse = flash_prefill(
        q,
        kc,
        vc,
        block_table=table[0],
        scale=d**-0.5,
        q_pos0=ctx - lq,
        rope_theta=THETA,
        dca=dca,
        yarn_original_max=50,
        config=config,
        out=nan_like(q),
        lse=torch.full((hq, lq), float("nan")),
        k_scale=ksc,
        v_scale=vsc,
        k_zero=zero,
    )
    qpos = torch.arange(ctx - lq, ctx)
    assert_close(out, lse, *reference(q, kd, vd, qpos, scale=d**-0.5, dca=dca, yarn=50), dtype)
    ref = reference(q, k, v, qpos, scale=d**-0.5, dca=dca, yarn=50)
    assert_quantization_error(out, lse, *ref)


def test_prefill_contiguous_keys():
    """block_table None: fresh fp8 keys [Lk, Hkv, D] with scales [Lk, Hkv]."""
    gen = torch.Generator().manual_seed(42)
    lq, hq, hkv, d = 120, 4, 2, 64
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k, v = (randn(lq, hkv, d, dtype=torch.float32, gen=gen) for _ in range(2))
    ((kq, ks, kd),), ((vq, vs, vd),) = quantized([k]), quantized([v])
    out, lse = flash_prefill(q, kq, vq, scale=0.125, k_scale=ks, v_scale=vs, config=SMALL)
    assert_close(out, lse, *reference(q, kd, vd, torch.arange(lq), scale=0.125), torch.float32)


def test_zero_point_keeps_outlier_keys_accurate():
    """Keys with outlier channels: per-token scales alone round the outliers by up to 1/16 of
    their size, and the logit error grows with q . outlier; stored relative to a zero point
    the residual is small and the error stays at N(0, 1) levels. Contiguous keys, no RoPE."""
    gen = torch.Generator().manual_seed(47)
    lq, hq, hkv, d = 96, 4, 2, 64
    offsets, zero = outlier_offsets(hkv, d, seed=7)
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k = randn(lq, hkv, d, dtype=torch.float32, gen=gen) + offsets
    v = randn(lq, hkv, d, dtype=torch.float32, gen=gen)
    exact = reference(q, k, v, torch.arange(lq), scale=0.125)
    ((vq, vs, _),) = quantized([v])
    errors = {}
    for name, z in (("zero point", zero), ("per-token only", None)):
        ((kq, ks, kd),) = quantized([k], z)
        out, lse = flash_prefill(
            q, kq, vq, scale=0.125, k_scale=ks, v_scale=vs, k_zero=z, config=SMALL
        )
        ((_, _, vd),) = quantized([v])
        ref = reference(q, kd, vd, torch.arange(lq), scale=0.125)
        assert_close(out, lse, *ref, torch.float32)  # the kernel is exact either way
        errors[name] = (lse.double() - exact[1]).abs().max().item()
    assert errors["zero point"] < QUANT_TOL
    assert errors["per-token only"] > 5 * errors["zero point"]


def test_rejects_bad_zero_point():
    q = torch.zeros(4, 2, 64)
    k8 = torch.zeros(2, 16, 1, 64, dtype=FP8_DTYPE)
    s = torch.ones(2, 16, 1)
    kw = dict(scale=1.0, block_table=torch.tensor([0, 1]), q_pos0=0)
    with pytest.raises(ValueError, match="k_zero must be"):
        flash_prefill(q, k8, k8, k_scale=s, v_scale=s, k_zero=torch.zeros(2, 64), **kw)
    with pytest.raises(ValueError, match="k_zero belongs"):
        flash_prefill(q, k8.float(), k8.float(), k_zero=torch.zeros(1, 64), **kw)


def test_prefill_with_unit_scales_equals_plain_cache():
    """Scales of 1 over e4m3-representable values: exactly the plain float32 kernel."""
    gen = torch.Generator().manual_seed(43)
    ctx, lq, hq, hkv, d = 150, 60, 4, 2, 64
    q = randn(lq, hq, d, dtype=torch.float32, gen=gen)
    k, v = (randn(ctx, hkv, d, dtype=torch.float32, gen=gen).to(FP8_DTYPE) for _ in range(2))
    kc, vc, table = paged_kv([k.float()], [v.float()], 16)
    ones = torch.ones(kc.shape[:3])
    kw = dict(block_table=table[0], scale=0.125, q_pos0=ctx - lq, config=SMALL)
    plain = flash_prefill(q, kc, vc, **kw)
    fp8 = flash_prefill(q, kc.to(FP8_DTYPE), vc.to(FP8_DTYPE), k_scale=ones, v_scale=ones, **kw)
    torch.testing.assert_close(fp8[0], plain[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fp8[1], plain[1], atol=1e-6, rtol=1e-6)


def test_no_tensor_descriptors_over_fp8():
    k = torch.zeros(4, 64, 2, 64, dtype=FP8_DTYPE)
    tma = fp.KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, tma=True)
    assert fp._kv_descriptors(k, k, True, tma) == (None, None)


def test_rejects_bad_scale_arguments():
    q = torch.zeros(4, 2, 64)
    k8 = torch.zeros(2, 16, 1, 64, dtype=FP8_DTYPE)
    s = torch.ones(2, 16, 1)
    table = torch.tensor([0, 1])
    kw = dict(scale=1.0, block_table=table, q_pos0=0)
    with pytest.raises(ValueError, match="both"):
        flash_prefill(q, k8, k8, k_scale=s, **kw)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        flash_prefill(q, k8.float(), k8.float(), k_scale=s, v_scale=s, **kw)
    with pytest.raises(ValueError, match="one per token"):
        flash_prefill(q, k8, k8, k_scale=s[:1], v_scale=s[:1], **kw)
    with pytest.raises(ValueError, match="float32"):
        flash_prefill(q, k8, k8, k_scale=s.double(), v_scale=s.double(), **kw)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_prefill(q, k8, k8, **kw)  # an fp8 cache without its scales
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_decode(q[:1], k8, k8, table[None], torch.tensor([3]), scale=1.0)


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------


def run_decode_fp8(q, ks, vs, *, page: int, partition_size: int, zero=None, **kw):
    kc, vc, ksc, vsc, table, kd, vd = fp8_paged(ks, vs, page, zero=zero)
    ctx = torch.tensor([k.shape[0] for k in ks], dtype=torch.int64)
    b, hq, d = q.shape
    max_context = table.shape[1] * page
    work = decode_workspace(b, hq, d, -(-max_context // partition_size), q.device)
    for w in work:
        w.fill_(float("nan"))
    out, lse = paged_decode(
        q,
        kc,
        vc,
        table,
        ctx,
        partition_size=partition_size,
        max_context=max_context,
        config=DECODE_SMALL,
        out=torch.full_like(q, float("nan")),
        lse=torch.full((hq, b), float("nan")),
        workspace=work,
        k_scale=ksc,
        v_scale=vsc,
        k_zero=zero,
        **kw,
    )
    return out, lse, kd, vd


def _batch(lens, hq, hkv, d, q_dtype, gen, dca=None, rope=False, offsets=0.0):
    q = randn(len(lens), hq, d, dtype=q_dtype, gen=gen)
    ks = [
        cached_keys(randn(n, hkv, d, dtype=torch.float32, gen=gen), dca, rope) + offsets
        for n in lens
    ]
    vs = [randn(n, hkv, d, dtype=torch.float32, gen=gen) for n in lens]
    return q, ks, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ragged_gqa(dtype):
    gen = torch.Generator().manual_seed(44)
    lens = [1, 37, 100, 300]
    offsets, zero = outlier_offsets(2, 64, seed=3)
    q, ks, vs = _batch(lens, 8, 2, 64, dtype, gen, rope=True, offsets=offsets)
    kw = dict(scale=0.125, rope=True)
    out, lse, kd, vd = run_decode_fp8(
        q, ks, vs, page=16, partition_size=64, zero=zero, scale=0.125, rope_theta=THETA
    )
    assert_close(out, lse, *reference_decode(q, kd, vd, **kw), dtype)
    assert_quantization_error(out, lse, *reference_decode(q, ks, vs, **kw))


def test_decode_dca():
    gen = torch.Generator().manual_seed(45)
    dca = DCA(48, 16)  # c = 32: intra only, + successive, + inter, chunk edges
    lens = [20, 33, 64, 65, 97, 250]
    offsets, zero = outlier_offsets(2, 64, seed=4)
    q, ks, vs = _batch(lens, 4, 2, 64, torch.float32, gen, dca=dca, offsets=offsets)
    kw = dict(scale=0.125, rope_theta=THETA, dca=dca, yarn_original_max=40)
    out, lse, kd, vd = run_decode_fp8(q, ks, vs, page=16, partition_size=48, zero=zero, **kw)
    ref_kw = dict(scale=0.125, dca=dca, yarn=40)
    assert_close(out, lse, *reference_decode(q, kd, vd, **ref_kw), torch.float32)
    assert_quantization_error(out, lse, *reference_decode(q, ks, vs, **ref_kw))


def test_decode_matches_prefill_of_last_token():
    gen = torch.Generator().manual_seed(46)
    dca = DCA(48, 16)
    offsets, zero = outlier_offsets(2, 64, seed=5)
    q, ks, vs = _batch([150], 4, 2, 64, torch.float32, gen, dca=dca, offsets=offsets)
    kc, vc, ksc, vsc, table, _, _ = fp8_paged(ks, vs, 16, zero=zero)
    kw = dict(scale=0.125, rope_theta=THETA, dca=dca, yarn_original_max=40)
    kw.update(k_scale=ksc, v_scale=vsc, k_zero=zero)
    out_d, lse_d = paged_decode(
        q, kc, vc, table, torch.tensor([150]), config=DECODE_SMALL, partition_size=64, **kw
    )
    out_p, lse_p = flash_prefill(q, kc, vc, block_table=table[0], q_pos0=149, **kw)
    torch.testing.assert_close(out_d, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_d, lse_p, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# vertical-slash sparse prefill
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_start,q_end,dca,hq,hkv,page,dtype",
    [
        (61, 203, None, 6, 2, 16, torch.float32),  # cached prefix, off-grid start, GQA 3
        (150, 250, "dca", 4, 2, 16, torch.float32),  # three DCA parts
        (140, 180, "dca", 4, 2, 16, torch.bfloat16),
    ],
    ids=["dense-gqa3", "dca", "dca-bf16"],
)
def test_vs_sparse(q_start, q_end, dca, hq, hkv, page, dtype):
    from longctx.ops.triton.vs_sparse import SparseKernelConfig, vs_sparse_attention
    from longctx.sparse.convert import convert_indices
    from longctx.sparse.estimate import estimate_indices
    from longctx.sparse.reference import index_masks, masked_reference
    from tests.sparse.helpers import DCA as SPARSE_DCA
    from tests.sparse.helpers import paged_cache, segments
    from tests.sparse.helpers import randn as srandn

    d, scale = 16, 0.25
    cfg = SparseKernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    offsets, zero = outlier_offsets(hkv, d, seed=6)
    keys, values = srandn(q_end, hkv, d, seed=1) + offsets, srandn(q_end, hkv, d, seed=2)
    ((kq, ks, kd),), ((vq, vs, vd),) = quantized([keys], zero), quantized([values])
    k_cache, v_cache, table = paged_cache(kq.float(), vq.float(), page, seed=3)
    k_scale, v_scale, table2 = paged_cache(ks[..., None], vs[..., None], page, seed=3)
    assert torch.equal(table, table2)
    k_cache, v_cache = k_cache.to(FP8_DTYPE), v_cache.to(FP8_DTYPE)
    k_scale, v_scale = k_scale[..., 0].contiguous(), v_scale[..., 0].contiguous()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    for s0, s1, parts in segments(q_start, q_end, SPARSE_DCA if dca else None):
        q = srandn(len(parts), s1 - s0, hq, d, seed=s0).to(dtype)
        rows = min(8, s1 - s0)
        sels = estimate_indices(
            q[:, -rows:], kd[:s1].to(dtype), parts, s1 - rows, [6] * hq, [30] * hq, scale=scale
        )
        index = convert_indices(sels, parts, s0, s1 - s0, block_m=cfg.block_m, block_n=16)
        masks = index_masks(index, s1)
        out, lse = vs_sparse_attention(
            q, k_cache, v_cache, table, index, scale=scale, config=cfg, k_scale=k_scale,
            v_scale=v_scale, k_zero=zero,
        )  # fmt: skip
        assert out.dtype == dtype
        want_out, want_lse = masked_reference(q, kd[:s1], vd[:s1], masks, scale=scale)
        torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
        raw = masked_reference(q, keys[:s1], values[:s1], masks, scale=scale)
        assert_quantization_error(out, lse, *raw)
