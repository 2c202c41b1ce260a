"""Owns the model, its KV cache and the attention backend; runs one scheduled batch per call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from longctx.config import EngineConfig, ModelConfig, resolve_kv_cache_dtype
from longctx.engine.abort import AbortSignal
from longctx.engine.cuda_graphs import DecodeGraphs
from longctx.engine.kv_cache import (
    allocate_kv_caches,
    blocks_for,
    kv_bytes_per_token,
    kv_cache_bytes,
    set_key_zero_points,
)
from longctx.engine.scheduler import ScheduledBatch
from longctx.engine.sequence import Sequence
from longctx.engine.timeline import GpuTimeline
from longctx.errors import OutOfKVMemoryError
from longctx.layers.attention import BatchLayout, ForwardContext, KVCache
from longctx.layers.attention.backend import to_device
from longctx.layers.attention.kv_quant import key_zero_points
from longctx.layers.attention.registry import make_backend
from longctx.layers.logits_processors import SequenceLogitsState
from longctx.layers.sampler import DeviceSample, SampleRequest, sample, top_logprobs
from longctx.models.qwen2 import Qwen2ForCausalLM, init_random_weights
from longctx.structured_output import TokenMasks

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


@dataclass
class LaunchedStep:
    """A step queued on the device; `result()` waits for its sampled tokens.

    A step with grammar-constrained rows holds its sampling back (`pending`) while a worker
    thread fills their token mask; `finish()` queues it. The engine calls it after its host
    work on the step before, so that the mask fills meanwhile; the next launch calls it
    anyway, since that step's inputs are these tokens."""

    batch: ScheduledBatch
    sampling: tuple[int, ...]  # batch rows that sample a token, in the order of device_tokens
    device_tokens: torch.Tensor | None  # [len(sampling)] on the device
    host: DeviceSample | None  # the same, being copied to host memory
    prompt_logprobs: tuple[list[dict[int, float]] | None, ...]
    pending: Callable[[], DeviceSample] | None = None

    def finish(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            sampled = pending()
            self.device_tokens, self.host = sampled.token_ids, sampled.to_host()

    def result(self) -> StepOutput:
        self.finish()
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
        if self.kv_caches[0].k_zero is not None:
            zeros = model_key_zero_points(self.model.model.layers, model_config)
            set_key_zero_points(self.kv_caches, zeros)
        self.graphs = self._decode_graphs(engine_config, max_model_len)
        self.timeline: GpuTimeline | None = None  # set to measure device idle time between steps
        self.abort_signal: AbortSignal | None = None  # set by the engine: see _abort_check
        self.masks = TokenMasks(model_config.vocab_size, device)
        self._mask_worker: ThreadPoolExecutor | None = None

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
        profile = lambda: self._profile_cuda_budget(cfg, max_batched)
        return kv_blocks_in_budget(per_block, self.block_size, cfg, self.device, profile)

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
        if prev is not None:
            prev.finish()  # its tokens are this step's inputs
        if self.timeline is not None:
            self.timeline.begin()
        ids, layout = step_inputs(batch, prev, self.block_size, self.device)
        sampling = tuple(i for i in range(len(batch.seqs)) if batch.samples(i))
        wants_prompt_lps = any(s.params.prompt_logprobs is not None for s in batch.seqs)
        if self.graphs is not None and self.graphs.fits(layout) and not wants_prompt_lps:
            logits = self.graphs.run(ids, layout)
            if len(sampling) < len(batch.seqs):
                logits = logits[list(sampling)]
            prompt_lps: tuple = (None,) * len(batch.seqs)
        else:
            meta = self.backend.prepare(layout, self.device)
            ctx = ForwardContext(self.backend, meta, self.kv_caches, self._abort_check(batch))
            hidden = self.model(ids, ctx)
            rows = [meta.query_starts[i + 1] - 1 for i in sampling]
            logits = self.model.compute_logits(hidden[rows]) if sampling else None
            prompt_lps = tuple(
                prompt_logprobs(
                    self.model,
                    batch,
                    i,
                    hidden,
                    meta.query_starts[i],
                    batch.seqs[i].num_computed_tokens,
                )
                for i in range(len(batch.seqs))
            )
        sampled = pending = None
        if sampling:
            reqs = [self._sample_request(batch.seqs[i]) for i in sampling]
            masks = self._start_masks([batch.seqs[i] for i in sampling], prev)
            if masks is None:
                sampled = sample(logits, reqs)
            else:
                pending = lambda: self._sample_masked(logits, reqs, masks)  # noqa: E731
        if self.timeline is not None:
            self.timeline.end()
        return LaunchedStep(
            batch=batch,
            sampling=sampling,
            device_tokens=sampled.token_ids if sampled is not None else None,
            host=sampled.to_host() if sampled is not None else None,
            prompt_logprobs=prompt_lps,
            pending=pending,
        )

    def _abort_check(self, batch: ScheduledBatch) -> Callable[[], None] | None:
        """For a step that prefills (the long kind), a look at the abort signal before each
        layer; decode steps are short and need none."""
        signal = self.abort_signal
        if signal is None or batch.num_tokens == len(batch.seqs):
            return None
        request_ids = [s.request_id for s in batch.seqs]
        return lambda: signal.check(request_ids)

    def _start_masks(
        self, seqs: list[Sequence], prev: LaunchedStep | None
    ) -> Future[tuple[list[int], torch.Tensor] | None] | None:
        """The token masks of the sequences with a grammar, filled by a worker thread (None:
        no grammar here). Started once the forward pass is queued; the thread waits for
        prev's tokens, advances the matchers over them and fills the bitmask while this
        thread goes on (which needs llguidance to release the GIL while it computes: the
        test of this overlap sleeps instead, and on a GPU it is not measured yet)."""
        if all(s.grammar is None for s in seqs):
            return None
        # Snapshots: the engine appends prev's tokens to these lists while the job runs. A
        # pending newest token is still in prev's sample (row pending_row).
        outputs = [list(s.output_token_ids) for s in seqs]
        rows = [s.pending_row if s.num_pending else None for s in seqs]

        def job() -> tuple[list[int], torch.Tensor] | None:
            start = time.perf_counter()
            res = prev.host.result() if prev is not None and prev.host is not None else None
            self.masks.times.wait_s += time.perf_counter() - start
            for out, r in zip(outputs, rows):
                if r is not None:
                    out.append(res.token_ids[r])
            return grammar_bitmask(self.masks, seqs, outputs)

        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="longctx-masks")
        return self._mask_worker.submit(job)

    @torch.inference_mode()  # called by LaunchedStep.finish, outside launch's inference mode
    def _sample_masked(
        self,
        logits: torch.Tensor,
        reqs: list[SampleRequest],
        masks: Future[tuple[list[int], torch.Tensor] | None],
    ) -> DeviceSample:
        filled = masks.result()
        if filled is not None:
            self.masks.apply(logits, *filled)
        return sample(logits, reqs)

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        return sample_request(seq, self.config.vocab_size, self.device)


def mask_grammars(
    masks: TokenMasks, logits: torch.Tensor, seqs: list[Sequence], newest: list[int | None]
) -> None:
    """Constrain the logits rows of sequences with a grammar, each advanced over its output
    tokens and newest[r] (one not in its token_ids yet; None: none)."""
    outputs = [
        s.output_token_ids if token is None else [*s.output_token_ids, token]
        for s, token in zip(seqs, newest)
    ]
    filled = grammar_bitmask(masks, seqs, outputs)
    if filled is not None:
        masks.apply(logits, *filled)


def grammar_bitmask(
    masks: TokenMasks, seqs: list[Sequence], outputs: list[list[int]]
) -> tuple[list[int], torch.Tensor] | None:
    """(rows, host bitmask) of the sequences with a grammar, each matcher advanced over its
    output tokens outputs[r] first; None if no sequence has a grammar."""
    rows = [r for r, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return None
    start = time.perf_counter()
    for r in rows:
        seqs[r].grammar.advance(outputs[r])
    masks.times.advance_s += time.perf_counter() - start
    return rows, masks.fill([seqs[r].grammar for r in rows])


def sample_request(seq: Sequence, vocab_size: int, device: torch.device) -> SampleRequest:
    """seq's sampling settings, with its penalty / logit-bias state built on first use."""
    if seq.logits_state is None and SequenceLogitsState.needed(seq.params):
        seq.logits_state = SequenceLogitsState.build(
            seq.params, seq.prompt_token_ids, seq.output_token_ids, vocab_size, device
        )
    return SampleRequest(seq.params, seq.generator, seq.logits_state)


def model_key_zero_points(layers: Iterable[torch.nn.Module], config: ModelConfig) -> torch.Tensor:
    """An fp8 cache's key zero points [len(layers), Hkv, D] from each decoder layer's k bias
    (kv_quant.key_zero_points), over the positions keys are cached at: [0, chunk_len) with DCA,
    else the model's max_position_embeddings. Model properties only (never an engine setting
    such as max_model_len), so fp8 KV saved by one engine reads back right in another with
    the same model and DCA (what the cache identity checks)."""
    biases = []
    for layer in layers:
        attn = layer.self_attn
        b = attn.qkv_proj.bias
        if b is None:
            b = torch.zeros(attn.q_size + 2 * attn.kv_size, device=attn.qkv_proj.weight.device)
        k_bias = b.detach()[attn.q_size : attn.q_size + attn.kv_size]
        biases.append(k_bias.float().view(config.num_kv_heads, config.head_dim))
    positions = config.dca.chunk_len if config.dca is not None else config.max_position_embeddings
    return key_zero_points(torch.stack(biases), config.rope_theta, positions)


def kv_blocks_in_budget(
    per_block: int,
    block_size: int,
    cfg: EngineConfig,
    device: torch.device,
    profile_cuda: Callable[[], float],
    where: str = "",
) -> int:
    """KV blocks of per_block bytes in the budget: kv_cache_gib, else on CUDA the free memory
    profile_cuda() finds, else the CPU default. where: a prefix for the error message."""
    if cfg.kv_cache_gib is not None:
        budget = cfg.kv_cache_gib * 2**30
    elif device.type == "cuda":
        budget = profile_cuda()
    else:
        budget = CPU_DEFAULT_KV_GIB * 2**30
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise OutOfKVMemoryError(
            f"{where}KV cache budget of {budget / 2**20:.1f} MiB holds no block of {block_size} "
            f"tokens ({per_block / 2**20:.2f} MiB each); raise kv_cache_gib"
        )
    return num_blocks


def step_inputs(
    batch: ScheduledBatch, prev: LaunchedStep | None, block_size: int, device: torch.device
) -> tuple[torch.Tensor, BatchLayout]:
    """A step's token ids (on the device) and layout; a token still on the device in prev
    is copied from there."""
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
        block_size=block_size,
    )
    tokens = to_device(torch.tensor(ids, dtype=torch.int64), device)
    if fill_at:
        at = to_device(torch.tensor(fill_at, dtype=torch.int64), device)
        src = to_device(torch.tensor(fill_from, dtype=torch.int64), device)
        tokens[at] = prev.device_tokens[src]
    return tokens, layout


def prompt_logprobs(
    model: Qwen2ForCausalLM,
    batch: ScheduledBatch,
    i: int,
    hidden: torch.Tensor,
    start: int,
    first: int,
) -> list[dict[int, float]] | None:
    """Logprobs of the prompt tokens sequence i's chunk predicts (row p predicts token p + 1):
    its rows start at hidden[start], its first token is at position first."""
    seq, n = batch.seqs[i], batch.num_new_tokens[i]
    want = seq.params.prompt_logprobs
    if want is None:
        return None
    last = min(first + n, seq.num_prompt_tokens - 1)  # positions whose successor is prompt
    out: list[dict[int, float]] = []
    for a in range(first, last, PROMPT_LOGPROB_ROWS):
        b = min(a + PROMPT_LOGPROB_ROWS, last)
        logits = model.compute_logits(hidden[start + a - first : start + b - first])
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
