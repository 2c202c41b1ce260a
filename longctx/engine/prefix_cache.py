"""Automatic prefix caching: content-addressed, reference-counted KV blocks (pure Python).

A full block (block_size tokens) is named by a hash chain over the tokens from position 0:

    h_0 = H(root, tokens[0 : bs])      h_i = H(h_{i-1}, tokens[i*bs : (i+1)*bs])

`root` digests everything else that changes what a block holds (`CacheIdentity`: the model's
weights fingerprint, compute and KV dtypes, block size, DCA and sparse settings). Equal hashes
therefore mean equal tokens from position 0 and equal KV: keys are cached already rotated, at
p mod c under DCA (the chunk boundaries fall on block boundaries), YaRN's factor lives in the
queries, and causal attention makes a prefix's keys independent of later tokens. With sparse
prefill a block holds what its first computation selected; a later prompt reusing it gets what
it would have got had its prefill been chunked at the cache boundary.

Block states (BlockPool):

    free (ref 0, no hash) --allocate--> held (ref >= 1) --last release, unhashed--> free
                                        held --last release, hashed--> cached (ref 0, LRU)
    cached --hit (acquire)--> held      cached --allocate with no free block left--> evicted

A block is hashed (`register`) only once its KV has been computed, i.e. queued on the device
before any step that could read it. Cached blocks count as free memory; `allocate` takes truly
free blocks first and then evicts the least recently released cached block, never a held one.
A table is released last block first, so a sequence's tail blocks are evicted before its head
(a chain is useless past its first missing block).

Sharing across sequences (n > 1 sampling): `BlockManager.fork` gives a child a new table that
holds references to every full block of the parent and a fresh block for the partial last one,
whose contents the caller copies (`kv_cache.copy_blocks`). Full blocks are never written again
(sequences only write at and after num_computed_tokens), so sharing them needs no copy-on-write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from longctx.config import ModelConfig

if TYPE_CHECKING:
    from longctx.sparse.config import SparseConfig

FINGERPRINT_SAMPLES = 256  # values read from each parameter for the weights fingerprint


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block given its predecessor's hash (or the root) and its token ids."""
    return hashlib.sha256(parent + np.asarray(tokens, dtype="<i8").tobytes()).digest()


def extend_hashes(
    root: bytes, hashes: list[bytes], token_ids: Sequence[int], block_size: int
) -> None:
    """Append the hashes of the full blocks of token_ids that `hashes` does not cover yet."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else root
        hashes.append(chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size]))


class BlockPool:
    """Reference-counted blocks with a hash -> block map of cached full blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, ref 0; oldest first

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")  # scheduler bug
        out = [self._take() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._lru.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def acquire(self, blocks: Iterable[int]) -> None:
        """One more reference to each block (cached blocks leave the LRU list)."""
        for b in blocks:
            if self._refs[b] == 0:
                self._lru.pop(b)
            self._refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._hash_of:
                self._lru[b] = None
            else:
                self._free.append(b)

    def num_unheld(self, blocks: Iterable[int]) -> int:
        """How many of blocks are cached with no holder (acquiring them uses up free memory)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def lookup(self, hashes: Iterable[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of hashes."""
        found = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def register(self, block: int, h: bytes) -> bool:
        """Name a held, computed block by its hash; False if either is already named (the
        same content computed twice stays private to its sequence)."""
        if h in self._block_of or block in self._hash_of:
            return False
        self._hash_of[block] = h
        self._block_of[h] = block
        return True

    def forget_all(self) -> None:
        """Drop every hash (after a failed step, when cached contents may be unwritten)."""
        self._free.extend(self._lru)
        self._lru.clear()
        self._hash_of.clear()
        self._block_of.clear()


@dataclass
class PrefixCacheStats:
    """Counters since start: tokens looked up at admission and tokens found cached."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    cached_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass(frozen=True)
class CacheIdentity:
    """What besides the token ids decides the contents of a KV block (also the compatibility
    check of saved KV: longctx/engine/saved_kv.py)."""

    model: str  # weights fingerprint (model_fingerprint)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    kv_cache_dtype: str
    block_size: int
    dca: dict[str, int] | None
    sparse: str | None  # digest of the sparse settings, None when dense

    def root(self) -> bytes:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).digest()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cache_identity(
    config: ModelConfig,
    model: torch.nn.Module,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    block_size: int,
    sparse: SparseConfig | None,
) -> CacheIdentity:
    return CacheIdentity(
        model=model_fingerprint(config, model),
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=str(dtype).removeprefix("torch."),
        kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
        block_size=block_size,
        dca=dataclasses.asdict(config.dca) if config.dca is not None else None,
        sparse=_sparse_digest(sparse),
    )


def model_fingerprint(config: ModelConfig, model: torch.nn.Module) -> str:
    """sha256 over the architecture and a strided sample of every parameter: two loads of the
    same weights agree, different weights (another checkpoint, another random seed) do not.
    Reading a sample rather than all weights keeps it to milliseconds for a 14B model."""
    arch = dataclasses.asdict(dataclasses.replace(config, dca=None, eos_token_ids=()))
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.float64)
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _sparse_digest(sparse: SparseConfig | None) -> str | None:
    if sparse is None:
        return None
    settings = dataclasses.asdict(dataclasses.replace(sparse, source=None))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
