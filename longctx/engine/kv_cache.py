"""Paged KV-cache bookkeeping (pure Python) and the cache tensors themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from longctx.config import ModelConfig
from longctx.engine.prefix_cache import BlockPool, PrefixCacheStats, extend_hashes
from longctx.layers.attention import KVCache
from longctx.layers.attention.kv_quant import as_bytes, is_fp8

if TYPE_CHECKING:
    from longctx.engine.sequence import Sequence as Seq


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Grows and releases the block tables of sequences. With a prefix root (prefix caching
    on), computed full blocks are named by their hash chain and shared: a sequence admitted
    with a cached prefix starts its prefill after it (longctx/engine/prefix_cache.py)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_root: bytes | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_root = prefix_root
        self._stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated: free plus cached ones no sequence holds."""
        return self.pool.num_free

    @property
    def caching(self) -> bool:
        return self.prefix_root is not None

    def extra_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks to add so that `table` covers num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.extra_blocks(table, num_tokens) <= self.pool.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        table.extend(self.pool.allocate(self.extra_blocks(table, num_tokens)))

    def release(self, table: list[int]) -> None:
        self.pool.release(table)
        table.clear()

    # --- prefix caching ---------------------------------------------------------------------
    def stats(self) -> PrefixCacheStats:
        return dataclasses.replace(self._stats, cached_blocks=self.pool.num_cached)

    def hashes(self, seq: Seq) -> list[bytes]:
        """The hash chain of seq's full blocks of known tokens (computed once, then extended)."""
        assert self.prefix_root is not None
        extend_hashes(self.prefix_root, seq.block_hashes, seq.token_ids, self.block_size)
        return seq.block_hashes

    def _hit_limit(self, seq: Seq) -> int:
        # At least the last token is computed again: its logits pick the next token.
        if not self.caching or seq.params.prompt_logprobs is not None:
            return 0  # prompt logprobs of cached tokens would be missing
        return (seq.num_tokens - 1) // self.block_size

    def prefix_hit(self, seq: Seq) -> list[int]:
        """The cached blocks a waiting seq's tokens start with."""
        if not self.caching:
            return []
        return self.pool.lookup(self.hashes(seq)[: self._hit_limit(seq)])

    def waits_for(self, seq: Seq, hit: list[int], in_progress: set[bytes]) -> bool:
        """Whether seq's next block after its hit is being computed by a running sequence: it
        then waits and shares that block (two clients asking about one document) rather than
        computing it again."""
        k = len(hit)
        return k < self._hit_limit(seq) and seq.block_hashes[k] in in_progress

    def in_progress(self, seqs: Iterable[Seq]) -> set[bytes]:
        """Hashes of the known full blocks these sequences hold or will compute, uncommitted."""
        if not self.caching:
            return set()
        return {h for s in seqs for h in s.block_hashes[s.num_committed_blocks :]}

    def can_admit(self, hit: list[int], num_tokens: int) -> bool:
        """Whether a sequence sharing `hit` can get blocks for num_tokens tokens."""
        new = blocks_for(num_tokens, self.block_size) - len(hit)
        return new + self.pool.num_unheld(hit) <= self.pool.num_free

    def admit(self, seq: Seq, hit: list[int]) -> None:
        """Give a waiting seq (empty table) the hit blocks; its prefill starts after them."""
        self.pool.acquire(hit)
        seq.block_table.extend(hit)
        seq.num_committed_blocks = len(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed_tokens
        if self.caching:
            self._stats.queried_tokens += seq.num_tokens
            self._stats.hit_tokens += seq.num_computed_tokens

    def commit(self, seq: Seq) -> None:
        """Name seq's computed full blocks by their hashes so later sequences can hit them.
        Called once the step computing them is queued on the device."""
        if not self.caching:
            return
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= seq.num_committed_blocks:
            return
        hashes = self.hashes(seq)
        for i in range(seq.num_committed_blocks, full):
            self.pool.register(seq.block_table[i], hashes[i])
        seq.num_committed_blocks = full

    def release_seq(self, seq: Seq, keep: bool) -> None:
        """Drop seq's blocks; keep: first commit what it computed (not after an abort, whose
        last step may have failed)."""
        if keep:
            self.commit(seq)
        self.release(seq.block_table)
        seq.num_committed_blocks = 0

    def fork(self, table: list[int], num_tokens: int) -> tuple[list[int], tuple[int, int] | None]:
        """A child table for the first num_tokens tokens of `table`: shared references to the
        full blocks and a fresh block for a partial last one; returns the table and the
        (source, destination) block whose KV the caller must copy (None if no partial block).
        For n > 1 sampling: each child then runs on its own from num_tokens."""
        full, rest = divmod(num_tokens, self.block_size)
        if rest and self.pool.num_free < 1:
            raise RuntimeError("no free KV block to fork into")  # callers check num_free
        child = table[:full]
        self.pool.acquire(child)
        if not rest:
            return child, None
        fresh = self.pool.allocate(1)[0]
        return [*child, fresh], (table[full], fresh)

    def forget_cached(self) -> None:
        """Drop every cached hash: after a failed step some cached blocks may be unwritten."""
        self.pool.forget_all()


def copy_blocks(caches: tuple[KVCache, ...], pairs: Sequence[tuple[int, int]]) -> None:
    """Copy whole blocks (values and fp8 scales) src -> dst in every layer (for fork)."""
    if not pairs:
        return
    src = torch.tensor([s for s, _ in pairs], device=caches[0].k.device)
    dst = torch.tensor([d for _, d in pairs], device=caches[0].k.device)
    for c in caches:
        for t in (c.k, c.v, c.k_scale, c.v_scale):
            if t is not None:
                as_bytes(t)[dst] = as_bytes(t)[src]


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
    # the keys' zero points: zeros until the runner calibrates them (set_key_zero_points)
    zeros = torch.zeros(
        (config.num_layers, config.num_kv_heads, config.head_dim),
        dtype=torch.float32,
        device=device,
    )
    return tuple(
        KVCache(
            k=storage[i, 0],
            v=storage[i, 1],
            k_scale=scales[i, 0],
            v_scale=scales[i, 1],
            k_zero=zeros[i],
        )
        for i in range(config.num_layers)
    )


def set_key_zero_points(caches: tuple[KVCache, ...], zeros: torch.Tensor) -> None:
    """Fix an fp8 cache's key zero points, zeros [num_layers, Hkv, D], before anything is
    written (keys already stored would be read back relative to the new points)."""
    for cache, z in zip(caches, zeros, strict=True):
        if cache.k_zero is not None:
            cache.k_zero.copy_(z)


def kv_cache_bytes(caches: tuple[KVCache, ...]) -> int:
    """Bytes the caches hold (values and scales)."""
    total = 0
    for c in caches:
        for t in (c.k, c.v, c.k_scale, c.v_scale, c.k_zero):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
