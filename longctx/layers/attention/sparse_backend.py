"""Sparse prefill: MInference vertical-slash attention for long prefill chunks, inside DCA or
over plain causal attention, wrapped around a dense backend that does everything else.

A sequence's prefill chunk goes sparse when its cached length after the chunk passes
SparseConfig.threshold (and the chunk has more than one query). Steps without such a chunk go
to the dense backend unchanged (the Triton backend on CUDA, the PyTorch DCA / plain backend on
the CPU); in a step that has one, the other sequences (decode tokens, short prompts) run
through the dense backend as a sub-batch. For a sparse chunk, per DCA segment
(longctx/ops/dca.py): the last `last_q` queries estimate each head's pattern per part
(longctx/sparse/estimate.py), the pattern becomes per-block tiles and columns
(longctx/sparse/convert.py), and the attention visits only those: the Triton kernel over the
paged cache on CUDA (longctx/ops/triton/vs_sparse.py), its PyTorch reference on the CPU
(longctx/sparse/reference.py).

Positions as the dense backends use them: keys cached rotated at p mod c (DCA) or p; queries
rotated per part (intra p mod c, successive min(p mod c + c, C), inter min(2c - 1, C)), times
the YaRN factor f(p)^2 (longctx/ops/dca.py). Estimation queries use continuous positions.

The pattern file is per layer, and the backend interface does not pass the layer: each step's
metadata counts the attention calls (the model calls layers 0..L-1 in order, once per step).
A `recorder` sees the attention recall exp(lse_sparse - lse_full) of sampled rows per layer
(`longctx calibrate`); an `observer` sees each segment's selected columns and diagonals
(benchmarks/capture_pattern_cpu.py records what a real model picks).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from longctx.config import DCAConfig, ModelConfig
from longctx.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    KVCache,
    build_common_metadata,
)
from longctx.layers.attention.kv_quant import load_blocks
from longctx.layers.attention.torch_backend import gather_kv, write_kv
from longctx.layers.rotary import RotaryEmbedding, apply_rotary
from longctx.ops.dca import DCASegment, dca_segments, key_positions, query_positions, yarn_factor
from longctx.profiling import PhaseTimer, maybe_phase
from longctx.sparse.config import SparseConfig
from longctx.sparse.convert import SegmentIndex, convert_indices
from longctx.sparse.estimate import (
    PartSelection,
    SparsePart,
    estimate_scores,
    segment_parts,
    select_indices,
)
from longctx.sparse.reference import dense_lse, sparse_attention_reference

Tensor = torch.Tensor

CPU_BLOCKS = (64, 64)  # (block_m, block_n) of the CPU reference path
RECALL_ROWS = 64  # evenly spaced rows per segment whose recall a recorder gets, besides the last


class RecallRecorder(Protocol):
    def record(self, layer: int, recall: Tensor) -> None:
        """recall [Hq, rows] in [0, 1]: share of each sampled row's attention that the sparse
        pattern kept."""


class SelectionOverride(Protocol):
    def replace(
        self,
        layer: int,
        segment: DCASegment,
        parts: tuple[SparsePart, ...],
        sel: list[PartSelection],
    ) -> list[PartSelection]:
        """The selections to attend with instead of the estimated ones (benchmarks replay a
        real model's patterns on random weights; the estimation still runs and is timed)."""


class SelectionObserver(Protocol):
    def selected(
        self,
        layer: int,
        segment: DCASegment,
        parts: tuple[SparsePart, ...],
        sel: list[PartSelection],
    ) -> None:
        """sel: one PartSelection per part (longctx/sparse/estimate.py), as estimated."""


@dataclass(frozen=True)
class SegmentPlan:
    """One DCA segment of a sparse prefill chunk: its parts, where its rows sit in the batch,
    and the rotation tables (YaRN factor folded in) of its queries per part."""

    segment: DCASegment
    parts: tuple[SparsePart, ...]
    rows: slice  # flat rows of the batch
    est_rows: slice  # the estimation queries: the segment's last rows
    q_cos: Tensor  # [P, n, D/2] attention rotation
    q_sin: Tensor
    sel_cos: Tensor  # [P, R, D/2] estimation rotation (continuous positions)
    sel_sin: Tensor


@dataclass(frozen=True)
class SparsePlan:
    """Which sequences of a step go sparse (batch index -> its segments), and a layer counter."""

    sequences: dict[int, tuple[SegmentPlan, ...]]
    num_layers: int
    _calls: Iterator[int] = field(default_factory=itertools.count)

    def next_layer(self) -> int:
        layer = next(self._calls)
        if layer >= self.num_layers:
            raise RuntimeError(
                f"attention ran {layer + 1} times in one step; the model has {self.num_layers} "
                "layers (one step = one metadata from prepare())"
            )
        return layer


@dataclass(frozen=True)
class SparseMetadata(AttentionMetadata):
    plan: SparsePlan | None = None
    dense: AttentionMetadata | None = None  # the whole step, when nothing in it goes sparse
    rest: AttentionMetadata | None = None  # the dense sub-batch beside sparse sequences
    rest_rows: Tensor | None = None  # its rows in the step's flat batch
    key_cos: Tensor | None = None  # [T, D/2] at the keys' (DCA) positions
    key_sin: Tensor | None = None


class SparseAttentionBackend(AttentionBackend):
    def __init__(
        self,
        config: ModelConfig,
        sparse: SparseConfig,
        dense: AttentionBackend,
        recorder: RecallRecorder | None = None,
        use_kernel: bool | None = None,
        observer: SelectionObserver | None = None,
    ) -> None:
        super().__init__(config)
        self.dense = dense
        self.prefill = SparsePrefill(config, sparse, self.scale, recorder, use_kernel, observer)

    @property
    def supports_cuda_graphs(self) -> bool:
        """Decode-only steps are the dense backend's own (metadata included), so its CUDA
        graphs capture them unchanged."""
        return self.dense.supports_cuda_graphs

    def prepare(self, layout: BatchLayout, device: torch.device) -> AttentionMetadata:
        if layout.is_decode_only:  # never sparse
            return self.dense.prepare(layout, device)
        base = build_common_metadata(layout, device)
        plan = self.prefill.plan(layout, base, self.rope)
        if not plan.sequences:
            return SparseMetadata(**vars(base), plan=plan, dense=self.dense.prepare(layout, device))
        rest = [i for i in range(len(layout.query_lens)) if i not in plan.sequences]
        rest_meta = rest_rows = None
        if rest:
            pick = lambda xs: tuple(xs[i] for i in rest)
            sub = BatchLayout(
                pick(layout.query_lens),
                pick(layout.context_lens),
                pick(layout.block_tables),
                layout.block_size,
            )
            rest_meta = self.dense.prepare(sub, device)
            starts = base.query_starts
            rows = [torch.arange(starts[i], starts[i + 1]) for i in rest]
            rest_rows = torch.cat(rows).to(device)
        dca = self.config.dca
        key_cos, key_sin = self.rope.cos_sin(
            key_positions(base.positions, dca) if dca else base.positions
        )
        return SparseMetadata(
            **vars(base),
            plan=plan,
            rest=rest_meta,
            rest_rows=rest_rows,
            key_cos=key_cos,
            key_sin=key_sin,
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> Tensor:
        if not isinstance(meta, SparseMetadata):  # a decode-only step
            return self.dense.forward(q, k, v, cache, meta)
        layer = meta.plan.next_layer()
        timer = self.prefill.timer
        if meta.dense is not None:
            with maybe_phase(timer, "attention.dense"):
                return self.dense.forward(q, k, v, cache, meta.dense)
        with maybe_phase(timer, "sparse.kv_write"):
            write_kv(cache, apply_rotary(k, meta.key_cos, meta.key_sin), v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.rest is not None:  # it writes its own rows' keys again: the same values
            r = meta.rest_rows
            with maybe_phase(timer, "attention.dense"):
                out[r] = self.dense.forward(q[r], k[r], v[r], cache, meta.rest)
        kernel = self.prefill.uses_kernel(q.device)
        for i, plans in meta.plan.sequences.items():
            table = meta.block_table[i]
            ctx = meta.layout.context_lens[i]
            with maybe_phase(timer, "sparse.key_gather"):
                keys, values = sequence_kv(cache, table, ctx, not kernel, q.dtype)
            for plan in plans:
                with maybe_phase(timer, "sparse.rotate"):
                    qr = q[plan.rows]
                    parts = range(len(plan.parts))
                    q_parts = torch.stack(
                        [apply_rotary(qr, plan.q_cos[p], plan.q_sin[p]) for p in parts]
                    )
                out[plan.rows] = self.prefill.attend(
                    layer, plan, q, q_parts, keys, values, cache, table
                )
        return out


def sequence_kv(
    cache: KVCache,
    block_table: Tensor,
    length: int,
    with_values: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """A sequence's keys (and values, for the CPU path), contiguous [length, Hkv, D]; an fp8
    cache dequantized to dtype (estimation and the CPU reference then see the cached values)."""
    if with_values:
        return gather_kv(cache, block_table, length, dtype)
    n = -(-length // cache.block_size)
    keys = load_blocks(cache.k, cache.k_scale, block_table[:n], length, dtype, cache.k_zero)
    return keys, None


class SparsePrefill:
    """Plans a step's sparse segments; estimation, conversion and attention of one segment."""

    def __init__(
        self,
        config: ModelConfig,
        sparse: SparseConfig,
        scale: float,
        recorder: RecallRecorder | None = None,
        use_kernel: bool | None = None,
        observer: SelectionObserver | None = None,
    ) -> None:
        sparse.check_model(config.num_layers, config.num_heads)
        self.config, self.sparse, self.scale, self.recorder = config, sparse, scale, recorder
        self.observer = observer
        self.override: SelectionOverride | None = None
        self.timer: PhaseTimer | None = None  # per-phase device/host time (benchmarks)
        self._use_kernel = use_kernel
        self._budgets = [sparse.budgets(lyr, config.num_heads) for lyr in range(config.num_layers)]
        self.first_layer = 0  # a pipeline stage's first layer: its steps count layers from there

    def uses_kernel(self, device: torch.device) -> bool:
        """The Triton kernel on CUDA (or when asked: the interpreter, in tests), else the
        PyTorch reference."""
        return self._use_kernel if self._use_kernel is not None else device.type == "cuda"

    # --- planning (once per step) -----------------------------------------------------------
    def plan(
        self, layout: BatchLayout, base: AttentionMetadata, rope: RotaryEmbedding
    ) -> SparsePlan:
        sequences = {}
        for i, (qlen, ctx) in enumerate(zip(layout.query_lens, layout.context_lens, strict=True)):
            if qlen > 1 and ctx > self.sparse.threshold:
                rows = slice(base.query_starts[i], base.query_starts[i + 1])
                sequences[i] = self._segments(base.positions[rows], ctx - qlen, rows.start, rope)
        return SparsePlan(sequences, self.config.num_layers, itertools.count(self.first_layer))

    def _segments(
        self, positions: Tensor, first: int, row0: int, rope: RotaryEmbedding
    ) -> tuple[SegmentPlan, ...]:
        """positions [n]: absolute positions first .. first + n - 1 of one sequence's rows."""
        dca = self.config.dca
        end = first + positions.shape[0]
        chunk = dca.chunk_len if dca is not None else end
        plans = []
        for seg in dca_segments(first, end, chunk):
            parts = tuple(segment_parts(seg, dca))
            a, b = seg.q_start - first, seg.q_end - first
            est = min(self.sparse.last_q, b - a)
            pos = positions[a:b]
            q_cos, q_sin = _tables(parts, pos, _attention_positions(parts, pos, dca), rope, dca)
            sel = torch.stack([p.selection_positions(pos[-est:]) for p in parts])
            sel_cos, sel_sin = _tables(parts, pos[-est:], sel, rope, dca)
            rows = slice(row0 + a, row0 + b)
            est_rows = slice(rows.stop - est, rows.stop)
            plans.append(SegmentPlan(seg, parts, rows, est_rows, q_cos, q_sin, sel_cos, sel_sin))
        return tuple(plans)

    # --- one segment ----------------------------------------------------------------------------
    def attend(
        self,
        layer: int,
        plan: SegmentPlan,
        q: Tensor,
        q_parts: Tensor,
        keys: Tensor,
        values: Tensor | None,
        cache: KVCache,
        block_table: Tensor,
    ) -> Tensor:
        """q [T, Hq, D] the step's unrotated queries (for the estimation rows); q_parts
        [P, n, Hq, D] the segment's rows rotated per part; keys (and on the CPU values)
        [ctx, Hkv, D] contiguous. Returns the segment's output [n, Hq, D]."""
        qe = q[plan.est_rows]
        q_sel = torch.stack(
            [apply_rotary(qe, plan.sel_cos[p], plan.sel_sin[p]) for p in range(len(plan.parts))]
        )
        vertical, slash = self._budgets[layer]
        seg = plan.segment
        block_m, block_n = self._blocks(q.device, q.shape[-1])
        est_pos0 = seg.q_end - q_sel.shape[1]
        with maybe_phase(self.timer, "sparse.estimate"):
            scores = estimate_scores(
                q_sel, keys, plan.parts, est_pos0, scale=self.scale,
                kernel=self.uses_kernel(q.device),
            )  # fmt: skip
        with maybe_phase(self.timer, "sparse.select"):
            selections = select_indices(
                scores, plan.parts, est_pos0, q_sel.shape[1], vertical, slash,
                shared_budget=self.sparse.dca_budget == "shared",
                unit=self.sparse.slash_unit, blocks=(block_m, block_n),
            )  # fmt: skip
        if self.override is not None:
            selections = self.override.replace(layer, seg, plan.parts, selections)
        if self.observer is not None:
            self.observer.selected(layer, seg, plan.parts, selections)
        with maybe_phase(self.timer, "sparse.convert"):
            index = convert_indices(
                selections, plan.parts, seg.q_start, seg.q_end - seg.q_start,
                block_m=block_m, block_n=block_n,
            )  # fmt: skip
        with maybe_phase(self.timer, "sparse.kernel"):
            out, lse = self._attention(q_parts, keys, values, cache, block_table, index)
        if self.recorder is not None:
            self._record(layer, plan, q_parts, keys, lse)
        return out

    def _blocks(self, device: torch.device, head_dim: int) -> tuple[int, int]:
        if not self.uses_kernel(device):
            return CPU_BLOCKS
        from longctx.ops.triton.vs_sparse import sparse_config

        cfg = sparse_config(head_dim)
        return cfg.block_m, cfg.block_n

    def _attention(
        self, q_parts, keys, values, cache: KVCache, block_table: Tensor, index: SegmentIndex
    ) -> tuple[Tensor, Tensor]:
        if self.uses_kernel(q_parts.device):
            from longctx.ops.triton.vs_sparse import vs_sparse_attention

            return vs_sparse_attention(
                q_parts,
                cache.k,
                cache.v,
                block_table,
                index,
                scale=self.scale,
                k_scale=cache.k_scale,
                v_scale=cache.v_scale,
                k_zero=cache.k_zero,
            )
        return sparse_attention_reference(q_parts, keys, values, index, scale=self.scale)

    def _record(
        self, layer: int, plan: SegmentPlan, q_parts: Tensor, keys: Tensor, lse: Tensor
    ) -> None:
        n = q_parts.shape[1]
        est = plan.est_rows.stop - plan.est_rows.start
        spread = torch.linspace(0, n - 1, min(RECALL_ROWS, n), device=lse.device).long()
        rows = torch.cat([spread, torch.arange(n - est, n, device=lse.device)]).unique()
        positions = plan.segment.q_start + rows
        full = dense_lse(q_parts[:, rows], keys, plan.parts, positions, scale=self.scale)
        self.recorder.record(layer, torch.exp(lse[:, rows] - full).clamp(max=1.0))


def _attention_positions(
    parts: tuple[SparsePart, ...], pos: Tensor, dca: DCAConfig | None
) -> Tensor:
    """[P, n] RoPE positions of the queries for each part (as the DCA backend rotates them)."""
    if dca is None:
        return pos[None]
    variants = query_positions(pos, dca)  # [3, n]
    # rows picked one by one: indexing with a Python list copies it to the device, a sync
    return torch.stack([variants[p.variant] for p in parts])


def _tables(
    parts: tuple[SparsePart, ...],
    pos: Tensor,
    rot: Tensor,
    rope: RotaryEmbedding,
    dca: DCAConfig | None,
) -> tuple[Tensor, Tensor]:
    """cos/sin [P, n, D/2] at rotation positions rot [P, n] of queries at absolute pos [n]."""
    cos, sin = rope.cos_sin(rot.flatten())
    shape = (len(parts), pos.shape[0], cos.shape[-1])
    cos, sin = cos.view(shape), sin.view(shape)
    if dca is not None:
        f2 = yarn_factor(pos, dca.original_max_position_embeddings).square()[None, :, None]
        cos, sin = cos * f2, sin * f2
    return cos, sin
