"""The attention-backend interface.

A backend owns everything position-dependent in attention: RoPE (DCA rotates queries several
ways), writing new keys/values into the paged cache, and the attention itself. The model hands it
unrotated q/k/v and gets the attention output back, so DCA, sparse and Triton backends plug in
without touching the model.

The runner describes each forward pass with a `BatchLayout` (host lists); the backend turns it
once per step into its own `AttentionMetadata` (device tensors), shared by every layer.

Paged cache layout, per layer: k and v each [num_blocks, block_size, num_kv_heads, head_dim].
Token t of a sequence lives in block block_table[t // block_size], row t % block_size:

    block_table = [7, 2, 9]          block_size = 4
    tokens 0..3 -> block 7, tokens 4..7 -> block 2, tokens 8..11 -> block 9
    slot(t) = block_table[t // 4] * 4 + t % 4

An fp8 cache (EngineConfig.kv_cache_dtype="fp8") stores k and v as float8_e4m3fn in the same
layout, plus float32 scales k_scale / v_scale [num_blocks, block_size, num_kv_heads], one per
(token, kv head): value = stored * scale (longctx/layers/attention/kv_quant.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longctx.config import ModelConfig
from longctx.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class KVCache:
    """One layer's paged cache: k, v [num_blocks, block_size, num_kv_heads, head_dim]; for an
    fp8 cache also k_scale, v_scale [num_blocks, block_size, num_kv_heads] float32 and the
    keys' zero point k_zero [num_kv_heads, head_dim] float32 (key = stored * scale + zero)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


@dataclass(frozen=True)
class BatchLayout:
    """What one forward pass computes, per sequence in batch order (host-side).

    query_lens[i] new tokens of sequence i are processed; context_lens[i] is its cached length
    after this pass (earlier tokens + the new ones); block_tables[i] covers context_lens[i].
    """

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    block_size: int
    # CUDA-graph steps: pad block tables to this width, and let no host-side choice depend on
    # the data (the captured kernels must serve every later replay).
    table_width: int = 0
    static: bool = False

    def __post_init__(self) -> None:
        if not (len(self.query_lens) == len(self.context_lens) == len(self.block_tables)):
            raise ValueError("BatchLayout fields must have one entry per sequence")

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step device tensors shared by all layers.

    positions [T]: absolute position of each new token; slot_mapping [T]: its cache slot;
    query_starts: host offsets of each sequence's tokens in the flat batch (len B + 1).
    """

    layout: BatchLayout
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_starts: tuple[int, ...]
    block_table: torch.Tensor  # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [B] int64


@dataclass(frozen=True)
class ForwardContext:
    """Everything attention layers need for one pass, passed explicitly through the model."""

    backend: AttentionBackend
    meta: AttentionMetadata
    kv_caches: tuple[KVCache, ...]
    # Called before each layer (the runner's abort check during prefill; it may raise).
    before_layer: Callable[[], None] | None = None


class AttentionBackend(ABC):
    # Whether a decode-only forward pass through this backend can be captured in a CUDA graph
    # (static shapes: no host syncs, no data-dependent sizes).
    supports_cuda_graphs: bool = False

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.scale = config.head_dim**-0.5
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)

    def prepare(self, layout: BatchLayout, device: torch.device) -> AttentionMetadata:
        """Build the step's metadata; subclasses extend it with what their kernels need."""
        return build_common_metadata(layout, device)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], unrotated -> attention output [T, Hq, D]."""


def build_common_metadata(layout: BatchLayout, device: torch.device) -> AttentionMetadata:
    bs = layout.block_size
    width = max(max((len(t) for t in layout.block_tables), default=0), layout.table_width)
    table = torch.zeros((len(layout.block_tables), max(width, 1)), dtype=torch.int64)
    positions, slots, starts = [], [], [0]
    for i, (qlen, ctx, blocks) in enumerate(
        zip(layout.query_lens, layout.context_lens, layout.block_tables)
    ):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        pos = torch.arange(ctx - qlen, ctx, dtype=torch.int64)
        positions.append(pos)
        slots.append(table[i, pos // bs] * bs + pos % bs)
        starts.append(starts[-1] + qlen)
    return AttentionMetadata(
        layout=layout,
        positions=to_device(torch.cat(positions), device),
        slot_mapping=to_device(torch.cat(slots), device),
        query_starts=tuple(starts),
        block_table=to_device(table, device),
        context_lens=to_device(torch.tensor(layout.context_lens, dtype=torch.int64), device),
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without making the host wait for the device's queue (pinned
    staging, non-blocking), so the next step can be prepared while the current one runs."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
