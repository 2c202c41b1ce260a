"""FP8 (e4m3) KV cache: quantize on write, dequantize on read (the PyTorch side).

Storage of a quantized layer cache (longctx/layers/attention/backend.py KVCache):

    k, v                torch.float8_e4m3fn [num_blocks, block_size, Hkv, D]
    k_scale, v_scale    torch.float32       [num_blocks, block_size, Hkv]

One dynamic scale per (token, kv head), computed when the token is written:

    scale  = max(amax over head_dim, AMAX_FLOOR) / 448
    stored = e4m3(clamp(x / scale, -448, 448))        (round to nearest even)
    value  = stored * scale

so the largest element of every row lands on 448 and the row keeps the full 3-bit mantissa:
an element whose |x| >= amax * 2^-6 / 448 (e4m3's normal range) is off by at most 2^-4 |x|;
smaller ones (subnormal) by at most 2^-10 * scale. Keys are quantized after RoPE (the value
the cache holds). A zero row stores zeros with scale AMAX_FLOOR / 448.

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


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., D] -> (e4m3 values [..., D], float32 scales [...]), one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    xq = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, scale


def dequantize_fp8(xq: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """e4m3 values [..., D] times their row scales [...] -> dtype (computed in float32)."""
    return (xq.float() * scale.float()[..., None]).to(dtype)


def as_bytes(x: Tensor) -> Tensor:
    """A uint8 view of an fp8 tensor (for indexing); other tensors unchanged."""
    return x.view(torch.uint8) if is_fp8(x.dtype) else x


def as_fp8(x: Tensor) -> Tensor:
    return x.view(FP8_DTYPE)


def store_rows(cache: Tensor, scales: Tensor | None, slots: Tensor, x: Tensor) -> None:
    """Write x [T, Hkv, D] into the cache rows `slots` (flat: block * block_size + row);
    quantized (values and scales) when the cache is fp8."""
    if scales is None:
        cache.view(-1, *cache.shape[2:])[slots] = x.to(cache.dtype)
        return
    xq, s = quantize_fp8(x)
    as_bytes(cache).view(-1, *cache.shape[2:])[slots] = as_bytes(xq)
    scales.view(-1, scales.shape[-1])[slots] = s


def load_rows(cache: Tensor, scales: Tensor | None, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows at flat slots (any index shape S) -> [*S, Hkv, D]: as stored for a plain cache,
    dequantized to dtype for an fp8 one."""
    if scales is None:
        return cache.view(-1, *cache.shape[2:])[slots]
    xq = as_fp8(as_bytes(cache).view(-1, *cache.shape[2:])[slots])
    return dequantize_fp8(xq, scales.view(-1, scales.shape[-1])[slots], dtype)


def load_blocks(
    cache: Tensor, scales: Tensor | None, blocks: Tensor, length: int, dtype: torch.dtype
) -> Tensor:
    """The first `length` tokens held by cache blocks `blocks` (in order) -> [length, Hkv, D]."""
    if scales is None:
        return cache[blocks].flatten(0, 1)[:length]
    xq = as_fp8(as_bytes(cache)[blocks].flatten(0, 1)[:length])
    return dequantize_fp8(xq, scales[blocks].flatten(0, 1)[:length], dtype)
