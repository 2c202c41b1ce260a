"""FP8 (e4m3) KV-cache quantization: error bounds, zero rows, outliers, the cache helpers."""

from __future__ import annotations

import pytest
import torch

from longctx.layers.attention import KVCache
from longctx.layers.attention.kv_quant import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8,
    key_zero_points,
    load_blocks,
    load_rows,
    quantize_fp8,
    rope_mean,
    store_rows,
)
from longctx.layers.attention.torch_backend import gather_kv, gather_slots, write_kv
from longctx.layers.rotary import RotaryEmbedding

REL = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest -> relative error <= 2^-4
SUB = 2.0**-10  # half the subnormal spacing 2^-9, in units of the row scale


def assert_within_e4m3(x: torch.Tensor, xq: torch.Tensor, scale: torch.Tensor) -> None:
    """|dequant - x| <= 2^-4 |x| (normal range) or 2^-10 * scale (subnormal), per element."""
    err = (dequantize_fp8(xq, scale, torch.float64) - x.double()).abs()
    bound = torch.maximum(REL * x.double().abs(), SUB * scale.double()[..., None])
    assert (err <= bound * (1 + 1e-6)).all(), (err / bound).max()


def test_round_trip_error_bound_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 128, generator=g) * torch.rand(64, 4, 1, generator=g) * 10
    xq, scale = quantize_fp8(x)
    assert xq.dtype == FP8_DTYPE and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    amax = x.abs().amax(-1)
    torch.testing.assert_close(scale, amax / FP8_MAX)
    # the largest element of each row is stored as +-448 (no saturation beyond it)
    assert (xq.float().abs().amax(-1) == FP8_MAX).all()
    assert_within_e4m3(x, xq, scale)
    # the typical error is well below the bound (uniform rounding error ~ 2^-5 on average)
    rel = (dequantize_fp8(xq, scale) - x).abs() / x.abs().clamp(min=1e-3)
    assert rel.median() < 2.0**-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_dtypes(dtype):
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    xq, scale = quantize_fp8(x)
    y = dequantize_fp8(xq, scale, dtype)
    assert y.dtype == dtype
    assert_within_e4m3(x.float(), xq, scale)


def test_zero_rows_and_tiny_rows():
    x = torch.zeros(3, 2, 32)
    x[1, 0] = 1e-20  # a row below the amax floor
    x[2, 1, 5] = -3.0  # one non-zero element, the rest zero
    xq, scale = quantize_fp8(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert scale[0, 0] == pytest.approx(AMAX_FLOOR / FP8_MAX)
    y = dequantize_fp8(xq, scale)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all() and (y[2, 0] == 0).all()
    assert y[2, 1, 5] == pytest.approx(-3.0, rel=1e-6)  # the amax element is exact
    assert (y[1, 0].abs() <= 1e-12).all()


def test_large_outliers():
    """Keys with |x| ~ 1e3 (attention-sink style outliers) beside ordinary values: the outlier
    row's scale follows its amax, so nothing saturates; small elements of that row lose
    relative precision (subnormal range) but stay within 2^-10 * scale."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 4, 128, generator=g)
    x[3, 1, 7] = 1234.5
    x[10, :, 0] = -980.0
    x[20, 2] *= 1e3
    xq, scale = quantize_fp8(x)
    assert torch.isfinite(dequantize_fp8(xq, scale)).all()
    assert_within_e4m3(x, xq, scale)
    y = dequantize_fp8(xq, scale)
    assert y[3, 1, 7] == pytest.approx(1234.5, rel=2.0**-4)
    assert y[10, 0, 0] == pytest.approx(-980.0, rel=2.0**-4)
    # rows without an outlier keep their own (small) scale
    assert scale[0].max() < 1.0


def test_values_past_e4m3_range_do_not_overflow():
    x = torch.tensor([[1e6, -3e5, 1.0, 0.0]])
    xq, scale = quantize_fp8(x)
    y = dequantize_fp8(xq, scale)
    assert torch.isfinite(y).all()
    assert y[0, 0] == pytest.approx(1e6, rel=1e-6)
    assert y[0, 1] == pytest.approx(-3e5, rel=2.0**-4)


def _fp8_cache(blocks: int, page: int, hkv: int, d: int, zero=None) -> KVCache:
    """An fp8 cache with NaN scales, so a row never written shows up as NaN."""
    k = torch.zeros(blocks, page, hkv, d, dtype=FP8_DTYPE)
    scales = [torch.full((blocks, page, hkv), float("nan")) for _ in range(2)]
    return KVCache(k=k, v=k.clone(), k_scale=scales[0], v_scale=scales[1], k_zero=zero)


def test_cache_helpers_write_and_read_back():
    g = torch.Generator().manual_seed(3)
    page, hkv, d = 4, 2, 16
    cache = _fp8_cache(6, page, hkv, d)
    assert cache.quantized and cache.block_size == page
    table = torch.tensor([5, 1, 3])
    length = 10
    k = torch.randn(length, hkv, d, generator=g)
    v = torch.randn(length, hkv, d, generator=g)
    pos = torch.arange(length)
    slots = table[pos // page] * page + pos % page
    write_kv(cache, k, v, slots)
    kq, ks = quantize_fp8(k)
    vq, vs = quantize_fp8(v)
    want_k, want_v = dequantize_fp8(kq, ks), dequantize_fp8(vq, vs)
    gk, gv = gather_kv(cache, table, length, torch.float32)
    assert torch.equal(gk, want_k) and torch.equal(gv, want_v)
    sk, sv = gather_slots(cache, slots[None, [0, 9, 3]], torch.float64)
    assert sk.shape == (1, 3, hkv, d) and sk.dtype == torch.float64
    assert torch.equal(sk[0], want_k[[0, 9, 3]].double())
    assert torch.equal(sv[0], want_v[[0, 9, 3]].double())
    assert torch.equal(load_blocks(cache.k, cache.k_scale, table, length, torch.float32), gk)
    assert torch.equal(load_rows(cache.v, cache.v_scale, slots, torch.float32), gv)


def test_plain_cache_helpers_unchanged():
    cache = torch.zeros(3, 4, 2, 8)
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(4))
    slots = torch.tensor([0, 1, 2, 3, 8])
    store_rows(cache, None, slots, x)
    assert torch.equal(load_rows(cache, None, slots, torch.float16), x)  # as stored
    assert torch.equal(load_blocks(cache, None, torch.tensor([0, 2]), 5, torch.float16), x)


@pytest.mark.parametrize("positions", [1, 7, 960, 32768, 10**6])
def test_rope_mean_equals_brute_force(positions):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 64, generator=g) * 50
    rope = RotaryEmbedding(64, 1e6)
    pos = torch.arange(min(positions, 40000))
    if positions > 40000:  # brute force over a strided sample is not exact: check the slow half
        pos = torch.arange(positions)
    rotated = torch.stack([rope.apply(x[i : i + 1].expand(len(pos), 2, 64), pos) for i in range(3)])
    brute = rotated.double().mean(dim=1)
    got = rope_mean(x, 1e6, positions)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), brute, atol=2e-4 * 50, rtol=0)


def test_zero_points_follow_low_frequency_bias():
    """Low-frequency channels (the last of each half) keep their bias; the fastest-rotating
    pair averages out over many positions."""
    bias = torch.zeros(1, 64)
    bias[0, 31], bias[0, 63], bias[0, 0], bias[0, 32] = 145.0, -30.0, 80.0, 40.0
    z = key_zero_points(bias, 1e6, 32768)
    # channel 63 rotates with 31 by up to 0.05 rad over 32768 positions: 145 * ~0.025 mixes in
    assert z[0, 31] == pytest.approx(145.0, rel=0.01) and abs(z[0, 63] + 30.0) < 5.0
    assert abs(z[0, 0]) < 0.05 and abs(z[0, 32]) < 0.05


def test_zero_point_cache_helpers():
    """Keys stored relative to a zero point read back as stored * scale + zero; values have
    none. Outlier keys near the zero point keep far more precision than without it."""
    g = torch.Generator().manual_seed(6)
    page, hkv, d, length = 4, 2, 16, 10
    zero = torch.zeros(hkv, d)
    zero[:, 3] = 145.0
    cache = _fp8_cache(6, page, hkv, d, zero)
    table = torch.tensor([5, 1, 3])
    k = torch.randn(length, hkv, d, generator=g) * 0.5 + zero
    v = torch.randn(length, hkv, d, generator=g)
    pos = torch.arange(length)
    slots = table[pos // page] * page + pos % page
    write_kv(cache, k, v, slots)
    gk, gv = gather_kv(cache, table, length, torch.float32)
    kq, ks = quantize_fp8(k, zero)
    assert torch.equal(gk, dequantize_fp8(kq, ks, torch.float32, zero))
    assert torch.equal(gv, dequantize_fp8(*quantize_fp8(v)))
    sk, _ = gather_slots(cache, slots[None, [9, 0]], torch.float64)
    assert torch.equal(sk[0], gk[[9, 0]].double())
    with_zero = (gk - k).abs().max()
    without = (dequantize_fp8(*quantize_fp8(k)) - k).abs().max()
    assert with_zero < 0.05 < without
