"""Shared by the sparse tests: segments with and without DCA, random inputs, paged caches."""

from __future__ import annotations

import torch

from longctx.config import DCAConfig
from longctx.ops.dca import dca_segments
from longctx.sparse.estimate import SparsePart, segment_parts

# C = 96, W = 32, c = 64: queries past 128 see all three parts (inter folded over 1-2 chunks).
DCA = DCAConfig(chunk_size=96, local_size=32, original_max_position_embeddings=96)


def segments(
    q_start: int, q_end: int, dca: DCAConfig | None
) -> list[tuple[int, int, list[SparsePart]]]:
    """(q_start, q_end, parts) of every DCA segment of the queries [q_start, q_end)."""
    chunk = dca.chunk_len if dca is not None else q_end
    return [
        (s.q_start, s.q_end, segment_parts(s, dca)) for s in dca_segments(q_start, q_end, chunk)
    ]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def paged_cache(
    k: torch.Tensor, v: torch.Tensor, page: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k/v [L, Hkv, D] scattered into a cache with a shuffled block table; unused rows NaN."""
    n = -(-k.shape[0] // page)
    perm = torch.randperm(2 * n + 1, generator=torch.Generator().manual_seed(seed))[:n]
    caches = []
    for x in (k, v):
        cache = torch.full((2 * n + 1, page, *x.shape[1:]), float("nan"), dtype=x.dtype)
        flat = cache[perm].flatten(0, 1)
        flat[: x.shape[0]] = x
        cache[perm] = flat.view(n, page, *x.shape[1:])
        caches.append(cache)
    return caches[0], caches[1], perm
