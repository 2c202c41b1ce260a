"""Plain-PyTorch attention over the paged cache: the CPU backend and the reference for the rest.

Prefill: each sequence's new queries attend to its whole cached context (earlier chunks plus
themselves), gathered from the block table; bottom-right causal. Decode-only steps gather every
sequence's keys into one padded batch and run a single masked SDPA.
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
from longctx.layers.rotary import apply_rotary
from longctx.ops.attention import attention_with_lse


@dataclass(frozen=True)
class TorchMetadata(AttentionMetadata):
    cos: torch.Tensor | None = None  # [T, D/2] float32
    sin: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None  # [B, Lmax] cache slots, decode-only steps
    decode_mask: torch.Tensor | None = None  # [B, Lmax] True = valid key


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    cache.k.view(-1, *cache.k.shape[2:])[slots] = k.to(cache.k.dtype)
    cache.v.view(-1, *cache.v.shape[2:])[slots] = v.to(cache.v.dtype)


def gather_kv(
    cache: KVCache, blocks: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of one sequence: [length, Hkv, D] each."""
    n = -(-length // cache.block_size)
    k = cache.k[blocks[:n]].flatten(0, 1)[:length]
    v = cache.v[blocks[:n]].flatten(0, 1)[:length]
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
    return slots, j[None, :] < meta.context_lens[:, None]


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
            if ctx == qlen:  # nothing cached before: use the fresh keys, skip the gather
                ki, vi = k[s:e], v[s:e]
            else:
                ki, vi = gather_kv(cache, meta.block_table[i], ctx)
            out[s:e] = attention_with_lse(q[s:e], ki, vi, scale=self.scale, causal=True)[0]
        return out

    def _decode(self, q: torch.Tensor, cache: KVCache, meta: TorchMetadata) -> torch.Tensor:
        kf = cache.k.view(-1, *cache.k.shape[2:])
        vf = cache.v.view(-1, *cache.v.shape[2:])
        return decode_attention(
            q, kf[meta.decode_slots], vf[meta.decode_slots], meta.decode_mask, self.scale
        )


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
