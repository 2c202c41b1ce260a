"""Dual Chunk Attention + YaRN scaling over the paged cache, in plain PyTorch (CPU and CUDA).

Position maths, the YaRN decision and a diagram are in `longctx.ops.dca`. Keys are rotated at
p mod c and cached rotated; each query is rotated three ways (intra / successive / inter) with
the YaRN factor f(p)^2 folded into its cos/sin tables, so the cache stays unscaled and no extra
rounding of q happens in half precision.

Prefill: per sequence, the new queries are grouped by DCA chunk; each group attends to its intra
keys (bottom-right causal), the previous chunk (successive) and all older chunks (inter), gathered
from the paged cache, and the three (out, lse) are merged. Decode-only steps gather every
sequence's keys into one padded batch and run one fused attention whose rows are the three query
variants of each head, each masked to its own keys; the rows are merged by lse (exact).
An fp8 cache is dequantized to the compute dtype as it is gathered (as in torch_backend.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    KVCache,
    build_common_metadata,
)
from longctx.layers.attention.torch_backend import (
    gather_kv,
    gather_slots,
    pad_with_first_slot,
    write_kv,
)
from longctx.layers.rotary import apply_rotary
from longctx.ops.attention import attention_with_lse, merge_attention
from longctx.ops.dca import (
    DCASegment,
    biased_attention_with_lse,
    dca_segments,
    key_parts,
    key_positions,
    query_positions,
    yarn_factor,
)

Tensor = torch.Tensor

DECODE_SPLIT = 4096  # keys per split in decode: long contexts become many parallel blocks


@dataclass(frozen=True)
class DCAMetadata(AttentionMetadata):
    key_cos: Tensor | None = None  # [T, D/2] at p mod c
    key_sin: Tensor | None = None
    query_cos: Tensor | None = None  # [3, T, D/2] intra / successive / inter, times f(p)^2
    query_sin: Tensor | None = None
    decode_slots: Tensor | None = None  # [B, Lpad] cache slots, decode-only steps
    decode_allowed: Tensor | None = None  # [B * S, 3, Lpad / S] variant v scores key j


class DCAAttentionBackend(AttentionBackend):
    def __init__(self, config: ModelConfig) -> None:
        if config.dca is None:
            raise ConfigError(
                "the 'dca' attention backend needs a DCA config (dual_chunk_attention_config "
                "in config.json, or LLM(dca=DCAConfig(...)))"
            )
        super().__init__(config)
        self.dca = config.dca

    # --- metadata -------------------------------------------------------------------------
    def prepare(self, layout: BatchLayout, device: torch.device) -> DCAMetadata:
        base = build_common_metadata(layout, device)
        key_cos, key_sin = self.rope.cos_sin(key_positions(base.positions, self.dca))
        query_cos, query_sin = self._query_tables(base.positions)
        decode: dict[str, Tensor] = {}
        if layout.is_decode_only:
            decode = decode_tables(base, layout.block_size, self.dca.chunk_len)
        return DCAMetadata(
            **vars(base),
            key_cos=key_cos,
            key_sin=key_sin,
            query_cos=query_cos,
            query_sin=query_sin,
            **decode,
        )

    def _query_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin [3, T, D/2] of the three query variants, scaled by f(p)^2.

        Scaling both cos and sin scales the rotated query: rot(q) * f^2 in one rounding.
        """
        qpos = query_positions(positions, self.dca)  # [3, T]
        cos, sin = self.rope.cos_sin(qpos.flatten())
        f2 = yarn_factor(positions, self.dca.original_max_position_embeddings).square()
        shape = (3, positions.shape[0], cos.shape[-1])
        return cos.view(shape) * f2[None, :, None], sin.view(shape) * f2[None, :, None]

    # --- attention ------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, meta: DCAMetadata) -> Tensor:
        k = apply_rotary(k, meta.key_cos, meta.key_sin)
        write_kv(cache, k, v, meta.slot_mapping)
        q3 = torch.stack([apply_rotary(q, meta.query_cos[i], meta.query_sin[i]) for i in range(3)])
        if meta.decode_slots is not None:
            return self._decode(q3, cache, meta)
        return self._prefill(q3, k, v, cache, meta)

    def _prefill(
        self, q3: Tensor, k: Tensor, v: Tensor, cache: KVCache, meta: DCAMetadata
    ) -> Tensor:
        out = torch.empty_like(q3[0])
        layout = meta.layout
        for i, (qlen, ctx) in enumerate(zip(layout.query_lens, layout.context_lens, strict=True)):
            s, e = meta.query_starts[i], meta.query_starts[i + 1]
            if ctx == qlen and not cache.quantized:  # nothing cached before: skip the gather
                keys, values = k[s:e], v[s:e]
            else:
                keys, values = gather_kv(cache, meta.block_table[i], ctx, q3.dtype)
            out[s:e] = self._sequence(q3[:, s:e], keys, values, ctx - qlen)
        return out

    def _sequence(self, q3: Tensor, keys: Tensor, values: Tensor, first: int) -> Tensor:
        """One sequence's queries q3 [3, n, Hq, D], at positions first.., over keys [L, Hkv, D]."""
        out = torch.empty_like(q3[0])
        for seg in dca_segments(first, first + q3.shape[1], self.dca.chunk_len):
            rows = slice(seg.q_start - first, seg.q_end - first)
            out[rows] = self._segment(q3[:, rows], keys, values, seg)
        return out

    def _segment(self, q3: Tensor, keys: Tensor, values: Tensor, seg: DCASegment) -> Tensor:
        parts = [self._part(q3[0], keys, values, seg.intra, causal=True)]
        for variant, (a, b) in ((1, seg.successive), (2, seg.inter)):
            if b > a:  # an empty part would only add lse = -inf
                parts.append(self._part(q3[variant], keys, values, (a, b), causal=False))
        return merge_attention(parts)[0]

    def _part(
        self, q: Tensor, keys: Tensor, values: Tensor, span: tuple[int, int], causal: bool
    ) -> tuple[Tensor, Tensor]:
        a, b = span
        return attention_with_lse(q, keys[a:b], values[a:b], scale=self.scale, causal=causal)

    def _decode(self, q3: Tensor, cache: KVCache, meta: DCAMetadata) -> Tensor:
        """One query per sequence, all sequences at once.

        The three variants of every head of a KV group are the rows of one fused attention, each
        row's bias letting through only its own keys. Keys are cut into S splits that run as
        separate batch entries (so a long context fills the GPU, flash-decoding style); the
        B*S*3 partial rows are then merged by lse (exact).
        """
        kg, vg = gather_slots(cache, meta.decode_slots, q3.dtype)  # [B, Lpad, Hkv, D]
        b, hq, d = q3.shape[1:]
        splits = meta.decode_allowed.shape[0] // b
        # [B, Lpad, Hkv, D] -> [B * S, Hkv, Lpad / S, D]: a view, no copy
        keys = kg.flatten(0, 1).unflatten(0, (b * splits, -1)).transpose(1, 2)
        values = vg.flatten(0, 1).unflatten(0, (b * splits, -1)).transpose(1, 2)
        hkv = keys.shape[1]
        groups = hq // hkv
        # [3, B, Hq, D] -> [B * S, Hkv, groups * 3, D], row g * 3 + variant
        qg = q3.permute(1, 2, 0, 3).reshape(b, 1, hkv, groups * 3, d).expand(-1, splits, -1, -1, -1)
        qg = qg.flatten(0, 1)
        bias = variant_bias(meta.decode_allowed, groups, qg.dtype)
        out, lse = biased_attention_with_lse(qg, keys, values, bias, scale=self.scale)
        return merge_splits(out, lse, b, groups).to(q3.dtype)


def merge_splits(out: Tensor, lse: Tensor, batch: int, groups: int) -> Tensor:
    """out [B * S, Hkv, groups * 3, D], lse [B * S, Hkv, groups * 3] -> [B, Hq, D] float32:
    a softmax over the lse of the S * 3 partial attentions of each head gives their weights."""
    n, hkv, _, d = out.shape
    # -> [B, Hkv, groups, S * 3]: the parts of one head side by side
    lse = lse.view(batch, n // batch, hkv, groups, 3).permute(0, 2, 3, 1, 4).flatten(3)
    out = out.view(batch, n // batch, hkv, groups, 3, d).permute(0, 2, 3, 1, 4, 5).flatten(3, 4)
    weights = torch.softmax(lse, dim=-1)
    return (out.float() * weights[..., None]).sum(3).reshape(batch, hkv * groups, d)


def decode_tables(meta: AttentionMetadata, block_size: int, chunk_len: int) -> dict[str, Tensor]:
    """Padded cache slots [B, Lpad] and which keys each query variant sees, per key split:
    [B * S, 3, Lpad / S].

    Lpad rounds the longest context up to 16 (fused kernels want bias rows 16-aligned), or to
    whole splits of DECODE_SPLIT keys once it is longer than one.
    """
    longest = max(meta.layout.context_lens)
    unit = 16 if longest <= DECODE_SPLIT else DECODE_SPLIT
    lpad = -(-longest // unit) * unit
    table = meta.block_table
    j = torch.arange(lpad, device=table.device)
    col = (j // block_size).clamp(max=table.shape[1] - 1).expand(table.shape[0], -1)
    valid = j[None, :] < meta.context_lens[:, None]
    slots = pad_with_first_slot(table.gather(1, col) * block_size + j % block_size, valid)
    parts = key_parts((meta.context_lens - 1)[:, None], j[None, :], chunk_len)  # new token: L - 1
    variants = torch.arange(3, device=table.device)[None, :, None]
    allowed = (parts[:, None, :] == variants) & valid[:, None, :]  # [B, 3, Lpad]
    split = min(lpad, DECODE_SPLIT)
    allowed = allowed.unflatten(2, (-1, split)).transpose(1, 2).flatten(0, 1)
    return {"decode_slots": slots, "decode_allowed": allowed}


def variant_bias(allowed: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """[N, 3, L] bool -> additive bias [N, 1, groups * 3, L]; a large finite negative masks."""
    n, _, length = allowed.shape
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, None].expand(n, 1, groups, 3, length).reshape(n, 1, groups * 3, length)
