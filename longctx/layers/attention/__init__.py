from longctx.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    ForwardContext,
    KVCache,
)
from longctx.layers.attention.layer import SelfAttention

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BatchLayout",
    "ForwardContext",
    "KVCache",
    "SelfAttention",
]
