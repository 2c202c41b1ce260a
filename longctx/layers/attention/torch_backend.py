"""Plain-PyTorch attention over the paged cache: the CPU backend and the reference for the rest.

Prefill: each sequence's new queries attend to its whole cached context (earlier chunks plus
themselves), gathered from the block table; bottom-right causal. Decode-only steps gather every
sequence's keys into one padded batch and run a single masked SDPA.

An fp8 cache (kv_quant.py) is dequantized to the compute dtype as it is gathered; attention
then always reads the cached (quantized) keys, also in a first chunk, so every chunking of a
prompt and every decode step sees the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    KVCache,
    build_common_metadata,
)
from longctx.layers.attention.kv_quant import load_blocks, load_rows, store_rows
from longctx.layers.rotary import apply_rotary
from longctx.ops.attention import attention_with_lse


@dataclass(frozen=True)
class TorchMetadata(AttentionMetadata):
    cos: torch.Tensor | None = None  # [T, D/2] float32
    sin: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None  # [B, Lmax] cache slots, decode-only steps
    decode_mask: torch.Tensor | None = None  # [B, Lmax] True = valid key


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k/v [T, Hkv, D] into cache slots (quantized for an fp8 cache)."""
    store_rows(cache.k, cache.k_scale, slots, k, cache.k_zero)
    store_rows(cache.v, cache.v_scale, slots, v)


def gather_kv(
    cache: KVCache, blocks: torch.Tensor, length: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of one sequence: [length, Hkv, D] each (an fp8 cache
    dequantized to dtype; a plain one as stored)."""
    n = -(-length // cache.block_size)
    k = load_blocks(cache.k, cache.k_scale, blocks[:n], length, dtype, cache.k_zero)
    v = load_blocks(cache.v, cache.v_scale, blocks[:n], length, dtype)
    return k, v


def gather_slots(
    cache: KVCache, slots: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at flat cache slots [...] -> [..., Hkv, D] each (fp8: dequantized)."""
    k = load_rows(cache.k, cache.k_scale, slots, dtype, cache.k_zero)
    v = load_rows(cache.v, cache.v_scale, slots, dtype)
    return k, v


def decode_gather_slots(
    meta: AttentionMetadata, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    lmax = int(max(meta.layout.context_lens))
    j = torch.arange(lmax, device=meta.block_table.device)
    blocks = meta.block_table.gather(
        1,
        (j // block_size)
        .clamp(max=meta.block_table.shape[1] - 1)
        .expand(meta.block_table.shape[0], -1),
    )
    slots = blocks * block_size + j % block_size
    valid = j[None, :] < meta.context_lens[:, None]
    return pad_with_first_slot(slots, valid), valid


def pad_with_first_slot(slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Point padding positions at each sequence's first token. Cache rows no token wrote are
    torch.empty memory and may hold NaN, which a zero probability would not cancel (0 * NaN is
    NaN); the first token's row is always written, so the masked-out values stay finite."""
    return torch.where(valid, slots, slots[:, :1])


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, layout: BatchLayout, device: torch.device) -> TorchMetadata:
        base = build_common_metadata(layout, device)
        cos, sin = self.rope.cos_sin(base.positions)
        slots = mask = None
        if layout.is_decode_only:
            slots, mask = decode_gather_slots(base, layout.block_size)
        return TorchMetadata(**vars(base), cos=cos, sin=sin, decode_slots=slots, decode_mask=mask)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, meta: TorchMetadata
    ) -> torch.Tensor:
        q = apply_rotary(q, meta.cos, meta.sin)
        k = apply_rotary(k, meta.cos, meta.sin)
        write_kv(cache, k, v, meta.slot_mapping)
        if meta.decode_slots is not None:
            return self._decode(q, cache, meta)
        out = torch.empty_like(q)
        layout = meta.layout
        for i, (qlen, ctx) in enumerate(zip(layout.query_lens, layout.context_lens)):
            s, e = meta.query_starts[i], meta.query_starts[i + 1]
            if ctx == qlen and not cache.quantized:  # nothing cached before: skip the gather
                ki, vi = k[s:e], v[s:e]
            else:
                ki, vi = gather_kv(cache, meta.block_table[i], ctx, q.dtype)
            out[s:e] = attention_with_lse(q[s:e], ki, vi, scale=self.scale, causal=True)[0]
        return out

    def _decode(self, q: torch.Tensor, cache: KVCache, meta: TorchMetadata) -> torch.Tensor:
        # decode_attention computes in float32: dequantize straight to it
        keys, values = gather_slots(cache, meta.decode_slots, torch.float32)
        return decode_attention(q, keys, values, meta.decode_mask, self.scale)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D], keys/values [B, L, Hkv, D], valid [B, L].

    Plain matmuls rather than SDPA: the key length changes every step, and SDPA's cuDNN path
    rebuilds its execution plan for each new shape (~1.4 ms of CPU per call, measured on H200),
    which made decode CPU-bound.
    """
    b, hq, d = q.shape
    hkv = keys.shape[2]
    qg = q.view(b, hkv, hq // hkv, d).float()  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,blhd->bhgl", qg, keys.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, values.float())
    return out.reshape(b, hq, d).to(q.dtype)
