"""Prefill chunk lengths for a pipeline: fixed, or DCPP (Dynamic Chunked Pipeline Parallelism).

In a pipeline, stage s works on chunk i while stage s - 1 works on chunk i + 1. With fixed
chunk lengths, later chunks attend to longer histories and cost more, so every stage waits on
its predecessor by the difference, and the last (dearest) chunk drains the pipeline alone.
DCPP (the Qwen2.5-1M report) picks each chunk's length so that every chunk has about the same
modelled cost; later chunks get fewer tokens.

The cost model counts FLOPs of one chunk [s, s + n) over all layers:

    linear:     n x 2 x (weights of the linear layers)        the LM head (one row) is left out
    attention:  4 x heads x head_dim x (query, key) pairs     dense: row p sees p + 1 keys
    sparse:     rows of a chunk that ends past the threshold see min(p + 1, K) keys, K the mean
                vertical + slash budget (x the DCA parts with per-part budgets), plus the
                estimation: last_q queries x all keys, once per DCA segment

DCA changes no count of dense pairs (it only re-labels positions); it splits a sparse chunk
into segments, each estimated on its own.

The lengths are capped by max_chunk (the activation memory of one forward pass), which binds
where a chunk of that length is cheapest (at the start, or with sparse prefill the first chunk
past the threshold): that chunk's cost is the target, the number of chunks follows from it,
and the target is then lowered until that many chunks end exactly at the prompt's end, so the
last chunk costs as much as the others.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from longctx.config import ModelConfig
from longctx.sparse.config import SparseConfig

CHUNK_POLICIES = ("fixed", "dcpp")
_BISECT_STEPS = 48  # halvings of the target cost: far below one aligned token of any chunk
MIN_STEPS = 8  # shorter chunks are not rounded to the alignment: 1/8 of a step at most


@dataclass(frozen=True)
class SparseCost:
    """What a sparse prefill chunk costs beyond its linear layers."""

    keys_per_row: float  # mean over layers and heads of vertical + slash
    threshold: int  # chunks whose sequence's length after them passes this go sparse
    estimate_queries: int  # last_q
    per_part: bool  # with DCA, the budget is spent in each key part


@dataclass(frozen=True)
class ChunkCostModel:
    """Modelled FLOPs of prefill chunks of one sequence, summed over the layers counted."""

    linear_flops: float  # per token
    pair_flops: float  # per (query, key) pair
    dca_chunk_len: int | None = None
    sparse: SparseCost | None = None

    @classmethod
    def of(
        cls, model: ModelConfig, sparse: SparseConfig | None = None, num_layers: int | None = None
    ) -> ChunkCostModel:
        """The model's cost (over num_layers layers, default all) with dense or sparse prefill."""
        layers = model.num_layers if num_layers is None else num_layers
        h = model.hidden_size
        per_layer = h * (model.q_size + 2 * model.kv_size) + model.q_size * h
        per_layer += 3 * h * model.intermediate_size
        return cls(
            linear_flops=2.0 * per_layer * layers,
            pair_flops=4.0 * model.q_size * layers,
            dca_chunk_len=model.dca.chunk_len if model.dca is not None else None,
            sparse=_sparse_cost(sparse, model) if sparse is not None else None,
        )

    def cost(self, start: int, n: int) -> float:
        """FLOPs of the chunk of n tokens at positions [start, start + n)."""
        end, sp = start + n, self.sparse
        if sp is None or n <= 1 or end <= sp.threshold:
            return n * self.linear_flops + self.pair_flops * _sum_min(start, end, end)
        segments = 1
        if self.dca_chunk_len is not None:
            segments = (end - 1) // self.dca_chunk_len - start // self.dca_chunk_len + 1
        # Estimation: only QK^T (2 of the 4 FLOPs a pair costs in attention).
        pairs = self._sparse_pairs(sp, start, end) + segments * sp.estimate_queries * end / 2
        return n * self.linear_flops + self.pair_flops * pairs

    def cheapest_full_chunk(self, length: int) -> float:
        """The least any chunk of this length costs: at position 0, or, with sparse prefill,
        the first one past the threshold (cost rises with the position on either side)."""
        best = self.cost(0, length)
        if self.sparse is not None:
            best = min(best, self.cost(max(0, self.sparse.threshold - length + 1), length))
        return best

    def _sparse_pairs(self, sp: SparseCost, start: int, end: int) -> float:
        c = self.dca_chunk_len
        if c is None or not sp.per_part:
            return _sum_min(start, end, sp.keys_per_row)
        # Per-part budgets: a row in DCA chunk j has min(j, 2) + 1 parts, each with K keys.
        total, a = 0.0, start
        for parts, stop in ((1, c), (2, 2 * c), (3, end)):
            b = min(max(stop, a), end)
            total += _sum_min(a, b, parts * sp.keys_per_row)
            a = b
        return total


def _sparse_cost(sparse: SparseConfig, model: ModelConfig) -> SparseCost:
    budgets = [sparse.budgets(layer, model.num_heads) for layer in range(model.num_layers)]
    keys = [v + s for vs, ss in budgets for v, s in zip(vs, ss)]
    return SparseCost(
        keys_per_row=sum(keys) / len(keys),
        threshold=sparse.threshold,
        estimate_queries=sparse.last_q,
        per_part=sparse.dca_budget == "per_part",
    )


def _sum_min(a: int, b: int, cap: float) -> float:
    """sum over rows p in [a, b) of min(p + 1, cap): the keys each row attends to."""
    if b <= a:
        return 0.0
    split = min(max(int(cap), a), b)  # rows below split see p + 1 < cap keys
    causal = (a + 1 + split) * (split - a) / 2
    return causal + cap * (b - split)


def plan_chunks(
    total: int, cost: ChunkCostModel, max_chunk: int, align: int = 1
) -> tuple[int, ...]:
    """DCPP chunk lengths covering [0, total): multiples of align (but the last), except
    chunks shorter than MIN_STEPS x align."""
    if total <= max_chunk:
        return (total,)
    step = max(1, min(align, max_chunk))
    cap = max_chunk - max_chunk % step
    target = cost.cheapest_full_chunk(cap)  # where the cap binds
    count = len(_greedy(total, cost, cap, step, target))
    lo, hi = 0.0, target
    for _ in range(_BISECT_STEPS):  # the largest target whose count - 1 chunks leave a last
        mid = (lo + hi) / 2  # chunk no dearer than them
        if _last_cost(total, cost, cap, step, mid, count) > mid:
            lo = mid
        else:
            hi = mid
    chunks = _greedy(total, cost, cap, step, hi, limit=count - 1)
    return (*chunks, total - sum(chunks))


def _last_cost(
    total: int, cost: ChunkCostModel, cap: int, step: int, target: float, count: int
) -> float:
    start = sum(_greedy(total, cost, cap, step, target, limit=count - 1))
    return cost.cost(start, total - start) if start < total else 0.0


def _greedy(
    total: int,
    cost: ChunkCostModel,
    cap: int,
    step: int,
    target: float,
    limit: int | None = None,
) -> list[int]:
    """Chunks from position 0, each the longest (aligned, <= cap) costing at most target."""
    chunks: list[int] = []
    start = 0
    while start < total and (limit is None or len(chunks) < limit):
        n = min(_longest(cost, start, cap, step, target), total - start)
        chunks.append(n)
        start += n
    return chunks


def _longest(cost: ChunkCostModel, start: int, cap: int, step: int, target: float) -> int:
    """The longest multiple of step whose chunk at start costs <= target; in single tokens
    when that is under MIN_STEPS steps (rounding would then move its cost too far), at least
    one token.

    Cost rises with the length except where a chunk crosses the sparse threshold and gets
    cheaper, so the dense and the sparse ranges are searched apart."""
    if step > 1 and cost.cost(start, MIN_STEPS * step) > target:
        return _longest(cost, start, MIN_STEPS * step, 1, target)
    ranges = [(1, cap // step)]
    if cost.sparse is not None and start < cost.sparse.threshold < start + cap:
        edge = (cost.sparse.threshold - start) // step
        ranges = [(1, edge), (edge + 1, cap // step)]
    best = 1
    for lo, hi in ranges:
        if lo > hi or cost.cost(start, lo * step) > target:
            continue
        while lo < hi:  # invariant: lo fits
            mid = (lo + hi + 1) // 2
            if cost.cost(start, mid * step) <= target:
                lo = mid
            else:
                hi = mid - 1
        best = max(best, lo)
    return best * step


class ChunkPolicy(Protocol):
    def next_chunk(self, start: int, total: int) -> int:
        """The most tokens the next prefill chunk of a sequence at start (of total) may take."""
        ...


@dataclass(frozen=True)
class FixedChunks:
    """Every chunk max_chunk tokens (the last: what is left)."""

    max_chunk: int

    def next_chunk(self, start: int, total: int) -> int:
        return self.max_chunk


@dataclass
class DCPPChunks:
    """Equal-cost chunks, planned once per sequence length."""

    cost: ChunkCostModel
    max_chunk: int
    align: int = 1
    _ends: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def boundaries(self, total: int) -> list[int]:
        """Where the chunks of a sequence of total tokens end."""
        if total not in self._ends:
            ends, pos = [], 0
            for n in plan_chunks(total, self.cost, self.max_chunk, self.align):
                pos += n
                ends.append(pos)
            self._ends[total] = ends
        return self._ends[total]

    def next_chunk(self, start: int, total: int) -> int:
        ends = self.boundaries(total)
        i = bisect.bisect_right(ends, start)
        return ends[i] - start if i < len(ends) else total - start
