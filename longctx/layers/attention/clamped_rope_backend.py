"""The no-extrapolation baseline DCA is measured against: plain RoPE with every position past
the model's trained length held at the last trained one.

    position id = min(p, max_position_embeddings - 1)

No query-key distance then exceeds what the model was trained on (as with DCA), but all tokens
past the limit share one position, so their order and their distance to the query are lost.
`longctx eval --positions-clamp N` runs it with max_position_embeddings set to N.
"""

from __future__ import annotations

import torch

from longctx.layers.attention.backend import BatchLayout, build_common_metadata
from longctx.layers.attention.torch_backend import (
    TorchAttentionBackend,
    TorchMetadata,
    decode_gather_slots,
)


class ClampedRopeBackend(TorchAttentionBackend):
    def prepare(self, layout: BatchLayout, device: torch.device) -> TorchMetadata:
        base = build_common_metadata(layout, device)
        limit = self.config.max_position_embeddings - 1
        cos, sin = self.rope.cos_sin(base.positions.clamp(max=limit))
        slots = mask = None
        if layout.is_decode_only:
            slots, mask = decode_gather_slots(base, layout.block_size)
        return TorchMetadata(**vars(base), cos=cos, sin=sin, decode_slots=slots, decode_mask=mask)
