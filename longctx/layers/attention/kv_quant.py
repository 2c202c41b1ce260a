"""FP8 (e4m3) KV cache: quantize on write, dequantize on read (the PyTorch side).

Storage of a quantized layer cache (longctx/layers/attention/backend.py KVCache):

    k, v                torch.float8_e4m3fn [num_blocks, block_size, Hkv, D]
    k_scale, v_scale    torch.float32       [num_blocks, block_size, Hkv]
    k_zero              torch.float32       [Hkv, D]

One dynamic scale per (token, kv head), computed when the token is written:

    scale  = max(amax over head_dim, AMAX_FLOOR) / 448
    stored = e4m3(clamp(x / scale, -448, 448))        (round to nearest even)
    value  = stored * scale

so the largest element of every row lands on 448 and the row keeps the full 3-bit mantissa:
an element whose |x| >= amax * 2^-6 / 448 (e4m3's normal range) is off by at most 2^-4 |x|;
smaller ones (subnormal) by at most 2^-10 * scale. Keys are quantized after RoPE (the value
the cache holds), relative to a zero point per (layer, kv head, channel), k_zero [Hkv, D]:

    stored = e4m3((k - k_zero) / scale),    key = stored * scale + k_zero

from the k projection's bias (key_zero_points): Qwen2's keys sit on large bias channels
(the default model's layer 0: |bias| up to 145, keys within ~0.5 of it), which per-token
scales alone round to 3 mantissa bits of the bias. Kernels add the zero point back as one
number per query row, q . k_zero. Values have no zero point. A zero row stores zeros with
scale AMAX_FLOOR / 448.

The Triton kernels (longctx/ops/triton) read the fp8 tiles and scales themselves and fold the
scales into the logits and P (never materialising a dequantized cache); the PyTorch backends
gather rows and dequantize them to the compute dtype with the helpers below.

Indexing goes through uint8 views of the fp8 tensors: every torch version indexes bytes, not
every one indexes float8 on every device.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12  # rows whose amax is below this (zero rows) get scale AMAX_FLOOR / 448

Tensor = torch.Tensor


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def quantize_fp8(x: Tensor, zero: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [..., D] -> (e4m3 values [..., D], float32 scales [...]), one scale per row, of
    x - zero (zero broadcasts over x's leading dimensions, e.g. [Hkv, D])."""
    xf = x.float() if zero is None else x.float() - zero.float()
    scale = xf.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    xq = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, scale


def dequantize_fp8(
    xq: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32, zero: Tensor | None = None
) -> Tensor:
    """e4m3 values [..., D] times their row scales [...], plus zero -> dtype (in float32)."""
    x = xq.float() * scale.float()[..., None]
    return (x if zero is None else x + zero.float()).to(dtype)


def as_bytes(x: Tensor) -> Tensor:
    """A uint8 view of an fp8 tensor (for indexing); other tensors unchanged."""
    return x.view(torch.uint8) if is_fp8(x.dtype) else x


def as_fp8(x: Tensor) -> Tensor:
    return x.view(FP8_DTYPE)


def store_rows(
    cache: Tensor, scales: Tensor | None, slots: Tensor, x: Tensor, zero: Tensor | None = None
) -> None:
    """Write x [T, Hkv, D] into the cache rows `slots` (flat: block * block_size + row);
    quantized (values and scales, relative to zero [Hkv, D]) when the cache is fp8."""
    if scales is None:
        cache.view(-1, *cache.shape[2:])[slots] = x.to(cache.dtype)
        return
    xq, s = quantize_fp8(x, zero)
    as_bytes(cache).view(-1, *cache.shape[2:])[slots] = as_bytes(xq)
    scales.view(-1, scales.shape[-1])[slots] = s


def load_rows(
    cache: Tensor,
    scales: Tensor | None,
    slots: Tensor,
    dtype: torch.dtype,
    zero: Tensor | None = None,
) -> Tensor:
    """Rows at flat slots (any index shape S) -> [*S, Hkv, D]: as stored for a plain cache,
    dequantized to dtype for an fp8 one."""
    if scales is None:
        return cache.view(-1, *cache.shape[2:])[slots]
    xq = as_fp8(as_bytes(cache).view(-1, *cache.shape[2:])[slots])
    return dequantize_fp8(xq, scales.view(-1, scales.shape[-1])[slots], dtype, zero)


def load_blocks(
    cache: Tensor,
    scales: Tensor | None,
    blocks: Tensor,
    length: int,
    dtype: torch.dtype,
    zero: Tensor | None = None,
) -> Tensor:
    """The first `length` tokens held by cache blocks `blocks` (in order) -> [length, Hkv, D]."""
    if scales is None:
        return cache[blocks].flatten(0, 1)[:length]
    xq = as_fp8(as_bytes(cache)[blocks].flatten(0, 1)[:length])
    return dequantize_fp8(xq, scales[blocks].flatten(0, 1)[:length], dtype, zero)


def rope_mean(x: Tensor, theta: float, num_positions: int) -> Tensor:
    """The mean over positions p in [0, num_positions) of RoPE(x, p) (rotate-half layout, as
    layers/rotary.py), x [..., D] -> float32 [..., D]. Closed form: the mean of e^{i p w} is
    (1 - e^{i P w}) / (P (1 - e^{i w})), in float64 so P = 10^6 loses nothing."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    w = inv_freq.to(x.device)
    n = float(num_positions)
    e1 = torch.polar(torch.ones_like(w), w)
    en = torch.polar(torch.ones_like(w), w * n)
    small = (w * n).abs() < 1e-9  # all P rotations ~identity: mean is 1
    mean = torch.where(small, torch.ones_like(e1), (1 - en) / (n * (1 - e1)))
    c, s = mean.real, mean.imag
    xd = x.double()
    x1, x2 = xd[..., : d // 2], xd[..., d // 2 :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).float()


def key_zero_points(k_bias: Tensor, theta: float, num_positions: int) -> Tensor:
    """An fp8 cache's key zero points from the k projection's bias, k_bias [..., Hkv, D]:
    where the cache holds keys rotated at positions [0, num_positions).

    Qwen2's k bias carries outlier channels (the default model's layer 0: |b| up to 145 in
    low-frequency channels, whose keys vary by ~0.5 around it). Per-token scales round such
    a key to 3 mantissa bits of 145; stored relative to the bias, the residual keeps them.
    Low-frequency channels barely rotate over the cached positions, so the rotated mean is
    the bias there, and ~0 in fast-rotating channels, where a fixed offset would not help.
    Derived from the weights, the points are the same for every prompt and every run (a
    calibration on the first request would make results depend on request history)."""
    return rope_mean(k_bias, theta, num_positions)
