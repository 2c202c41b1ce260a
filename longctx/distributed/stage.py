"""One pipeline stage: its slice of the model, its attention backend and the KV cache of its
layers, sized from its own device's memory.

Stage 0 also holds the embedding and the LM head, the last stage the final norm. A stage's
model is the full Qwen2ForCausalLM with the modules of other stages replaced by empty ones,
so parameter names (and the checkpoint's tensor names) stay those of the whole model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from longctx.config import EngineConfig, ModelConfig, resolve_kv_cache_dtype
from longctx.engine.kv_cache import (
    allocate_kv_caches,
    blocks_for,
    kv_bytes_per_token,
    kv_cache_bytes,
    set_key_zero_points,
)
from longctx.engine.model_runner import WeightSource, kv_blocks_in_budget, model_key_zero_points
from longctx.layers.attention import AttentionMetadata, BatchLayout, ForwardContext, KVCache
from longctx.layers.attention.registry import make_backend
from longctx.layers.attention.sparse_backend import SparseAttentionBackend
from longctx.models.qwen2 import Qwen2ForCausalLM, init_random_weights


@dataclass(frozen=True)
class StageSpec:
    """What every stage process builds from (picklable; sent by stage 0 at start-up)."""

    model: ModelConfig
    engine: EngineConfig  # block_size resolved
    layers: tuple[range, ...]  # per stage
    dtype: torch.dtype
    device_type: str
    max_num_batched_tokens: int
    weights_path: str | None  # reloaded by each worker; None: random weights (engine.seed)
    num_threads: int  # torch threads of a worker process (CPU)

    @property
    def num_stages(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class StageTask:
    """One micro-batch as it travels down the pipeline: its layout and which rows of the last
    stage's output go back to stage 0 (None: all, for prompt logprobs). A control task (no
    micro-batch) passes down the pipeline too: "stop", or "report" (each stage sends its
    BusyTime to stage 0)."""

    layout: BatchLayout
    return_rows: tuple[int, ...] | None
    control: str | None = None


_EMPTY = BatchLayout((), (), (), 1)
STOP = StageTask(_EMPTY, None, control="stop")
REPORT = StageTask(_EMPTY, None, control="report")


@dataclass(frozen=True)
class BusyTime:
    """Time a stage spent computing micro-batches since its last report."""

    rank: int
    seconds: float
    micro_batches: int


class BusyClock:
    """Measures compute spans: device time between CUDA events, host time on the CPU."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds, self._count = 0.0, 0

    @contextmanager
    def busy(self) -> Iterator[None]:
        self._count += 1
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t

    def take(self) -> BusyTime:
        """The time so far (waiting for the device), then start again from zero."""
        seconds = self._seconds + sum(a.elapsed_time(b) for a, b in self._sync()) / 1e3
        out = BusyTime(self.rank, seconds, self._count)
        self._events, self._seconds, self._count = [], 0.0, 0
        return out

    def _sync(self) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
        if self._events:
            self._events[-1][1].synchronize()
        return self._events


class Stage:
    def __init__(
        self, spec: StageSpec, rank: int, device: torch.device, weights: WeightSource
    ) -> None:
        self.spec, self.rank, self.device = spec, rank, device
        self.layers = spec.layers[rank]
        self.is_first, self.is_last = rank == 0, rank == spec.num_stages - 1
        cfg = spec.engine
        self.block_size = cfg.block_size
        self.kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, spec.dtype)
        self.model = build_stage_model(spec, rank, weights, device)
        self.backend = make_backend(cfg.attention_backend, spec.model, device.type, cfg.sparse)
        if isinstance(self.backend, SparseAttentionBackend):
            self.backend.prefill.first_layer = self.layers.start
        self.kv_caches: tuple[KVCache | None, ...] = ()
        self.clock = BusyClock(rank, device)

    @property
    def hidden_size(self) -> int:
        return self.spec.model.hidden_size

    def kv_blocks(self) -> int:
        """How many KV blocks this stage's memory holds for its layers."""
        per_block = kv_bytes_per_token(self._own_layers_config(), self.kv_dtype) * self.block_size
        return kv_blocks_in_budget(
            per_block,
            self.block_size,
            self.spec.engine,
            self.device,
            self._profile_cuda_budget,
            where=f"pipeline stage {self.rank}: ",
        )

    def allocate(self, num_blocks: int) -> None:
        self.kv_caches = self._caches(num_blocks)
        own = self.kv_caches[self.layers.start : self.layers.stop]
        if own and own[0].k_zero is not None:
            layers = [self.model.model.layers[i] for i in self.layers]
            zeros = model_key_zero_points(layers, self.spec.model)
            set_key_zero_points(own, zeros)

    def _caches(self, num_blocks: int) -> tuple[KVCache | None, ...]:
        """Caches for this stage's layers, at their model-wide indices (None elsewhere)."""
        own = allocate_kv_caches(
            self._own_layers_config(), num_blocks, self.block_size, self.kv_dtype, self.device
        )
        n = self.spec.model.num_layers
        return (None,) * self.layers.start + own + (None,) * (n - self.layers.stop)

    def _own_layers_config(self) -> ModelConfig:
        return dataclasses.replace(self.spec.model, num_layers=len(self.layers))

    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMetadata,
        caches: tuple[KVCache | None, ...] | None = None,
    ) -> torch.Tensor:
        """Token ids [T] (stage 0) or hidden states [T, hidden] -> hidden states [T, hidden]."""
        ctx = ForwardContext(self.backend, meta, caches or self.kv_caches)
        inner = self.model.model
        if self.is_first:
            x = inner.embed_tokens(x)
        for i in self.layers:
            x = inner.layers[i](x, ctx)
        return x

    def final(self, hidden: torch.Tensor, rows: tuple[int, ...] | None) -> torch.Tensor:
        """The last stage's output rows for stage 0, normed."""
        picked = hidden if rows is None else hidden[list(rows)]
        return self.model.model.norm(picked)

    def _profile_cuda_budget(self) -> float:
        """Free memory after this stage's weights and one full-size forward pass."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.spec.max_num_batched_tokens
        blocks = blocks_for(tokens, self.block_size)
        caches = self._caches(blocks)
        layout = BatchLayout((tokens,), (tokens,), (tuple(range(blocks)),), self.block_size)
        if self.is_first:
            x = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        else:
            x = torch.zeros(tokens, self.hidden_size, dtype=self.spec.dtype, device=self.device)
        with torch.inference_mode():
            hidden = self.forward(x, self.backend.prepare(layout, self.device), caches)
            if self.is_last:
                hidden = self.final(hidden, (tokens - 1,))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        cache_bytes = kv_cache_bytes(tuple(c for c in caches if c is not None))
        del caches, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return total * self.spec.engine.gpu_memory_utilization - (peak - cache_bytes)


def build_stage_model(
    spec: StageSpec, rank: int, weights: WeightSource, device: torch.device
) -> Qwen2ForCausalLM:
    """Build on the meta device with the other stages' modules emptied, materialise the rest
    on the target and fill it from the checkpoint (its tensors of this stage only)."""
    config, layers = spec.model, spec.layers[rank]
    first, last = rank == 0, rank == spec.num_stages - 1
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for i in range(config.num_layers):
        if i not in layers:
            model.model.layers[i] = nn.Identity()
    if not first:
        model.model.embed_tokens, model.lm_head = nn.Identity(), nn.Identity()
    if not last:
        model.model.norm = nn.Identity()
    model = model.to(dtype=spec.dtype).to_empty(device=device)
    if first and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if weights is None:
        init_random_weights(model, spec.engine.seed + rank)
    else:
        model.load_weights(_owned(weights(), layers, first, last))
    return model.eval()


def _owned(
    tensors: Iterator[tuple[str, torch.Tensor]], layers: range, first: bool, last: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        if name.startswith("model.layers."):
            keep = int(name.split(".")[2]) in layers
        elif name.startswith(("model.embed_tokens.", "lm_head.")):
            keep = first
        elif name.startswith("model.norm."):
            keep = last
        else:  # not ours to judge: load_weights names what has no place
            keep = True
        if keep:
            yield name, tensor
