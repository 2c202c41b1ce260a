"""Owns the model, its KV cache and the attention backend; runs one scheduled batch per call."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from longctx.config import EngineConfig, ModelConfig, resolve_kv_cache_dtype
from longctx.engine.cuda_graphs import DecodeGraphs
from longctx.engine.kv_cache import (
    allocate_kv_caches,
    blocks_for,
    kv_bytes_per_token,
    kv_cache_bytes,
)
from longctx.engine.scheduler import ScheduledBatch
from longctx.engine.timeline import GpuTimeline
from longctx.errors import OutOfKVMemoryError
from longctx.layers.attention import BatchLayout, ForwardContext, KVCache
from longctx.layers.attention.backend import to_device
from longctx.layers.attention.registry import make_backend
from longctx.layers.sampler import DeviceSample, SampleRequest, sample, top_logprobs
from longctx.models.qwen2 import Qwen2ForCausalLM, init_random_weights

log = logging.getLogger(__name__)

WeightSource = Callable[[], Iterator[tuple[str, torch.Tensor]]] | None

CPU_DEFAULT_KV_GIB = 4.0
PROMPT_LOGPROB_ROWS = 1024  # rows of [rows, vocab] float32 logits materialised at once


@dataclass(frozen=True)
class StepOutput:
    """Per sequence of the batch: the sampled token (None if still prefilling) and logprobs."""

    token_ids: tuple[int | None, ...]
    logprobs: tuple[dict[int, float] | None, ...]
    prompt_logprobs: tuple[list[dict[int, float]] | None, ...]


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device; `result()` waits for its sampled tokens."""

    batch: ScheduledBatch
    sampling: tuple[int, ...]  # batch rows that sample a token, in the order of device_tokens
    device_tokens: torch.Tensor | None  # [len(sampling)] on the device
    host: DeviceSample | None  # the same, being copied to host memory
    prompt_logprobs: tuple[list[dict[int, float]] | None, ...]

    def result(self) -> StepOutput:
        n = len(self.batch.seqs)
        tokens: list[int | None] = [None] * n
        lps: list[dict[int, float] | None] = [None] * n
        if self.host is not None:
            res = self.host.result()
            for j, i in enumerate(self.sampling):
                tokens[i], lps[i] = res.token_ids[j], res.logprobs[j]
        return StepOutput(tuple(tokens), tuple(lps), self.prompt_logprobs)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        weights: WeightSource,
        device: torch.device,
        dtype: torch.dtype,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.config = model_config
        self.device, self.dtype = device, dtype
        self.kv_dtype = resolve_kv_cache_dtype(engine_config.kv_cache_dtype, dtype)
        self.block_size = engine_config.block_size
        self.model = build_model(model_config, weights, device, dtype, engine_config.seed)
        self.backend = make_backend(
            engine_config.attention_backend, model_config, device.type, engine_config.sparse
        )
        self.num_blocks = self._kv_capacity(engine_config, max_num_batched_tokens)
        # One block more than the allocator hands out: scratch space for CUDA-graph padding rows.
        self.kv_caches: tuple[KVCache, ...] = allocate_kv_caches(
            model_config, self.num_blocks + 1, self.block_size, self.kv_dtype, device
        )
        self.graphs = self._decode_graphs(engine_config, max_model_len)
        self.timeline: GpuTimeline | None = None  # set to measure device idle time between steps

    def _decode_graphs(self, cfg: EngineConfig, max_model_len: int) -> DecodeGraphs | None:
        if cfg.enforce_eager or self.device.type != "cuda" or not self.backend.supports_cuda_graphs:
            return None
        graphs = DecodeGraphs(
            self.model,
            self.backend,
            self.kv_caches,
            self.block_size,
            table_width=blocks_for(max_model_len, self.block_size),
            scratch_block=self.num_blocks,
            max_batch=cfg.max_num_seqs,
            device=self.device,
        )
        graphs.capture()
        return graphs

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _kv_capacity(self, cfg: EngineConfig, max_batched: int) -> int:
        per_block = kv_bytes_per_token(self.config, self.kv_dtype) * self.block_size
        if cfg.kv_cache_gib is not None:
            budget = cfg.kv_cache_gib * 2**30
        elif self.device.type == "cuda":
            budget = self._profile_cuda_budget(cfg, max_batched)
        else:
            budget = CPU_DEFAULT_KV_GIB * 2**30
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise OutOfKVMemoryError(
                f"KV cache budget of {budget / 2**20:.1f} MiB holds no block of {self.block_size} "
                f"tokens ({per_block / 2**20:.2f} MiB each); raise kv_cache_gib"
            )
        return num_blocks

    def _profile_cuda_budget(self, cfg: EngineConfig, max_batched: int) -> float:
        """Free memory after weights and one full-size forward pass (peak activations)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        blocks = blocks_for(max_batched, self.block_size)
        caches = allocate_kv_caches(
            self.config, blocks, self.block_size, self.kv_dtype, self.device
        )
        table = tuple(range(blocks))
        layout = BatchLayout((max_batched,), (max_batched,), (table,), self.block_size)
        ids = torch.zeros(max_batched, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            meta = self.backend.prepare(layout, self.device)
            hidden = self.model(ids, ForwardContext(self.backend, meta, caches))
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        cache_bytes = kv_cache_bytes(caches)
        del caches, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        return total * cfg.gpu_memory_utilization - (peak - cache_bytes)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one forward pass and its sampling on the device; return without waiting.

        A sequence whose newest token was sampled by `prev` (still in flight) gets it straight
        from prev's device tensor, so the next step can be queued before the host knows it.
        """
        if self.timeline is not None:
            self.timeline.begin()
        ids, layout = self._inputs(batch, prev)
        sampling = tuple(i for i in range(len(batch.seqs)) if batch.samples(i))
        wants_prompt_lps = any(s.params.prompt_logprobs is not None for s in batch.seqs)
        if self.graphs is not None and self.graphs.fits(layout) and not wants_prompt_lps:
            logits = self.graphs.run(ids, layout)
            if len(sampling) < len(batch.seqs):
                logits = logits[list(sampling)]
            prompt_lps: tuple = (None,) * len(batch.seqs)
        else:
            meta = self.backend.prepare(layout, self.device)
            hidden = self.model(ids, ForwardContext(self.backend, meta, self.kv_caches))
            rows = [meta.query_starts[i + 1] - 1 for i in sampling]
            logits = self.model.compute_logits(hidden[rows]) if sampling else None
            prompt_lps = tuple(
                self._prompt_logprobs(batch, i, hidden, meta.query_starts[i])
                for i in range(len(batch.seqs))
            )
        sampled = None
        if sampling:
            reqs = [SampleRequest(batch.seqs[i].params, batch.seqs[i].generator) for i in sampling]
            sampled = sample(logits, reqs)
        if self.timeline is not None:
            self.timeline.end()
        return LaunchedStep(
            batch=batch,
            sampling=sampling,
            device_tokens=sampled.token_ids if sampled is not None else None,
            host=sampled.to_host() if sampled is not None else None,
            prompt_logprobs=prompt_lps,
        )

    def _inputs(
        self, batch: ScheduledBatch, prev: LaunchedStep | None
    ) -> tuple[torch.Tensor, BatchLayout]:
        ids: list[int] = []
        fill_at: list[int] = []  # flat positions whose token is still on the device
        fill_from: list[int] = []  # its row in prev.device_tokens
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            known = seq.token_ids[start : start + n]
            ids.extend(known)
            if len(known) < n:
                if n - len(known) != 1 or prev is None or prev.device_tokens is None:
                    raise RuntimeError(f"request {seq.request_id}: token not sampled yet")
                fill_at.append(len(ids))
                fill_from.append(seq.pending_row)
                ids.append(0)
        layout = BatchLayout(
            query_lens=batch.num_new_tokens,
            context_lens=tuple(
                s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)
            ),
            block_tables=tuple(tuple(s.block_table) for s in batch.seqs),
            block_size=self.block_size,
        )
        tokens = to_device(torch.tensor(ids, dtype=torch.int64), self.device)
        if fill_at:
            at = to_device(torch.tensor(fill_at, dtype=torch.int64), self.device)
            src = to_device(torch.tensor(fill_from, dtype=torch.int64), self.device)
            tokens[at] = prev.device_tokens[src]
        return tokens, layout

    def _prompt_logprobs(
        self, batch: ScheduledBatch, i: int, hidden: torch.Tensor, start: int
    ) -> list[dict[int, float]] | None:
        """Logprobs of the prompt tokens this chunk predicts (row p predicts token p + 1)."""
        seq, n = batch.seqs[i], batch.num_new_tokens[i]
        want = seq.params.prompt_logprobs
        if want is None:
            return None
        first = seq.num_computed_tokens
        last = min(first + n, seq.num_prompt_tokens - 1)  # positions whose successor is prompt
        out: list[dict[int, float]] = []
        for a in range(first, last, PROMPT_LOGPROB_ROWS):
            b = min(a + PROMPT_LOGPROB_ROWS, last)
            logits = self.model.compute_logits(hidden[start + a - first : start + b - first])
            targets = torch.tensor(seq.token_ids[a + 1 : b + 1], device=logits.device)
            out.extend(top_logprobs(torch.log_softmax(logits, -1), want, targets))
        return out


def build_model(
    config: ModelConfig, weights: WeightSource, device: torch.device, dtype: torch.dtype, seed: int
) -> Qwen2ForCausalLM:
    """Build on the meta device, then materialise once on the target in the target dtype."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if weights is None:
        init_random_weights(model, seed)
    else:
        model.load_weights(weights())
    return model.eval()
