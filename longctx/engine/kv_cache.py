"""Paged KV-cache bookkeeping (pure Python) and the cache tensors themselves."""

from __future__ import annotations

from collections import deque

import torch

from longctx.config import ModelConfig
from longctx.layers.attention import KVCache
from longctx.layers.attention.kv_quant import is_fp8


class BlockAllocator:
    """Fixed-size blocks handed out from a free list."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")  # scheduler bug
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Grows and releases the block tables of sequences."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks to add so that `table` covers num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(table, num_tokens) <= self.allocator.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        table.extend(self.allocator.allocate(self.extra_blocks(table, num_tokens)))

    def release(self, table: list[int]) -> None:
        self.allocator.free(table)
        table.clear()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes per token for k/v stored in dtype: an fp8 cache also holds a float32 scale
    per token, kv head, layer and k/v."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    heads = 2 * config.num_layers * config.num_kv_heads
    scales = heads * 4 if is_fp8(dtype) else 0
    return heads * config.head_dim * itemsize + scales


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[KVCache, ...]:
    """One allocation for all layers (and one for an fp8 cache's scales); torch.empty so
    untouched CPU pages cost nothing. dtype: what k/v are stored in."""
    shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    storage = torch.empty(shape, dtype=dtype, device=device)
    if not is_fp8(dtype):
        return tuple(KVCache(k=storage[i, 0], v=storage[i, 1]) for i in range(config.num_layers))
    scales = torch.empty(shape[:-1], dtype=torch.float32, device=device)
    return tuple(
        KVCache(k=storage[i, 0], v=storage[i, 1], k_scale=scales[i, 0], v_scale=scales[i, 1])
        for i in range(config.num_layers)
    )


def kv_cache_bytes(caches: tuple[KVCache, ...]) -> int:
    """Bytes the caches hold (values and scales)."""
    total = 0
    for c in caches:
        for t in (c.k, c.v, c.k_scale, c.v_scale):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
