"""Triton attention over the paged cache (CUDA; the interpreter runs it on the CPU in tests).

Keys are rotated here (at p, or at p mod c with DCA) and written to the cache; queries go to the
kernels unrotated and are rotated there, so DCA's three query variants never reach HBM. Prefill
and mixed steps use one varlen launch for the whole batch; decode-only steps use the split-K
paged decode kernel. YaRN (with DCA) multiplies the logits of the query at p by f(p)^2, the same
decision as the PyTorch DCA backend (longctx.ops.dca). An fp8 cache is quantized as it is
written (kv_quant.py) and read by the kernels as fp8 tiles with their scales. On sm_90 the
prefill runs the Hopper kernel (ops/triton/flash_prefill_ws.py); the host copies of the
batch's integers in the metadata let DCA's parts run there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.config import ModelConfig
from longctx.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    KVCache,
    build_common_metadata,
)
from longctx.layers.attention.torch_backend import write_kv
from longctx.layers.rotary import apply_rotary
from longctx.ops.dca import key_positions
from longctx.ops.triton import flash_prefill_varlen, paged_decode
from longctx.ops.triton.flash_prefill import HostLayout


@dataclass(frozen=True)
class TritonMetadata(AttentionMetadata):
    key_cos: torch.Tensor | None = None  # [T, D/2] at the keys' (DCA) positions
    key_sin: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None  # int32 [B + 1]
    q_pos0: torch.Tensor | None = None  # int32 [B]: position of each sequence's first new token
    k_end: torch.Tensor | None = None  # int32 [B]: cached length after this step
    max_query_len: int = 0
    use_dca: bool = False  # False when every key is in the first DCA chunk (DCA == dense there)
    host: HostLayout | None = None  # the per-sequence integers on the host (DCA on Hopper)


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.dca = config.dca
        self.yarn_original = config.dca.original_max_position_embeddings if config.dca else None

    def prepare(self, layout: BatchLayout, device: torch.device) -> TritonMetadata:
        base = build_common_metadata(layout, device)
        kpos = key_positions(base.positions, self.dca) if self.dca else base.positions
        key_cos, key_sin = self.rope.cos_sin(kpos)
        q_pos0 = [c - n for c, n in zip(layout.context_lens, layout.query_lens)]

        def i32(xs) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int32).to(device)

        return TritonMetadata(
            **vars(base),
            key_cos=key_cos,
            key_sin=key_sin,
            cu_seqlens_q=i32(base.query_starts),
            q_pos0=i32(q_pos0),
            k_end=i32(layout.context_lens),
            max_query_len=max(layout.query_lens),
            host=HostLayout(
                tuple(layout.query_lens),
                tuple(q_pos0),
                (0,) * len(q_pos0),
                tuple(layout.context_lens),
            ),
            use_dca=self.dca is not None
            and (layout.static or max(layout.context_lens) > self.dca.chunk_len),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: KVCache,
        meta: TritonMetadata,
    ) -> torch.Tensor:
        write_kv(cache, apply_rotary(k, meta.key_cos, meta.key_sin), v, meta.slot_mapping)
        kw = dict(
            scale=self.scale,
            rope_theta=self.config.rope_theta,
            dca=self.dca if meta.use_dca else None,
            yarn_original_max=self.yarn_original,
            k_scale=cache.k_scale,
            v_scale=cache.v_scale,
            k_zero=cache.k_zero,
        )
        if meta.layout.is_decode_only:
            out, _ = paged_decode(q, cache.k, cache.v, meta.block_table, meta.k_end, **kw)
            return out
        out, _ = flash_prefill_varlen(
            q,
            cache.k,
            cache.v,
            cu_seqlens_q=meta.cu_seqlens_q,
            max_seqlen_q=meta.max_query_len,
            q_pos0=meta.q_pos0,
            k_end=meta.k_end,
            block_table=meta.block_table,
            causal=True,
            host=meta.host,
            **kw,
        )
        return out
