"""CUDA graphs of the decode-only forward pass, one per padded batch size.

Decode at batch 1 is a few hundred small kernels per token; launching them from Python costs
more than running them. Each bucket (1, 2, 4, ... sequences) is captured once with static
buffers; a step copies its inputs and metadata into the bucket's buffers and replays. Padding
rows decode one token against a scratch KV block that no sequence owns, and are discarded.
"""

from __future__ import annotations

import dataclasses

import torch

from longctx.layers.attention import AttentionBackend, BatchLayout, ForwardContext, KVCache
from longctx.models.qwen2 import Qwen2ForCausalLM

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    meta: object
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        backend: AttentionBackend,
        kv_caches: tuple[KVCache, ...],
        block_size: int,
        table_width: int,
        scratch_block: int,
        max_batch: int,
        device: torch.device,
    ) -> None:
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.block_size, self.table_width = block_size, table_width
        self.scratch_block = scratch_block
        self.device = device
        self.buckets = tuple(b for b in DEFAULT_BUCKETS if b <= max_batch) or (1,)
        self._captured: dict[int, _Captured] = {}
        self._pool = None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _padded(self, layout: BatchLayout, size: int) -> BatchLayout:
        pad = size - len(layout.query_lens)
        return BatchLayout(
            query_lens=layout.query_lens + (1,) * pad,
            context_lens=layout.context_lens + (1,) * pad,
            block_tables=layout.block_tables + ((self.scratch_block,),) * pad,
            block_size=self.block_size,
            table_width=self.table_width,
            static=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        for size in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
            self._captured[size] = self._capture(size)

    def _capture(self, size: int) -> _Captured:
        empty = BatchLayout((), (), (), self.block_size)
        meta = self.backend.prepare(self._padded(empty, size), self.device)
        ids = torch.zeros(size, dtype=torch.int64, device=self.device)
        ctx = ForwardContext(self.backend, meta, self.kv_caches)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up compiles kernels outside the capture
            for _ in range(2):
                self.model.compute_logits(self.model(ids, ctx))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.compute_logits(self.model(ids, ctx))
        self._pool = graph.pool()
        return _Captured(graph, ids, meta, logits)

    def fits(self, layout: BatchLayout) -> bool:
        return layout.is_decode_only and len(layout.query_lens) <= self.max_batch

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of n <= max_batch sequences."""
        n = len(layout.query_lens)
        size = next(b for b in self.buckets if b >= n)
        cap = self._captured[size]
        fresh = self.backend.prepare(self._padded(layout, size), self.device)
        for f in dataclasses.fields(fresh):
            value = getattr(fresh, f.name)
            if isinstance(value, torch.Tensor):
                getattr(cap.meta, f.name).copy_(value)
        cap.input_ids[:n].copy_(input_ids)
        cap.input_ids[n:].zero_()
        cap.graph.replay()
        return cap.logits[:n]
