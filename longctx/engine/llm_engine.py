"""The engine loop: schedule -> run -> update sequences -> report outputs."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from longctx.config import DCAConfig, EngineConfig, ModelConfig, resolve_dtype
from longctx.engine.abort import AbortSignal, StepAborted
from longctx.engine.forks import PromptForks
from longctx.engine.kv_cache import BlockManager, blocks_for
from longctx.engine.model_runner import LaunchedStep, ModelRunner
from longctx.engine.outputs import RequestOutput
from longctx.engine.prefix_cache import PrefixCacheStats, cache_identity
from longctx.engine.scheduler import ScheduledBatch, Scheduler
from longctx.engine.sequence import Sequence
from longctx.errors import (
    ConfigError,
    OutOfKVMemoryError,
    PromptTooLongError,
    SamplingParamsError,
)
from longctx.loading.checkpoint import Checkpoint
from longctx.sampling_params import SamplingParams
from longctx.structured_output import GrammarCompiler, StructuredOutputError
from longctx.tokenizer import IncrementalDetokenizer

CPU_DEFAULT_BATCHED_TOKENS = 8192
CUDA_DEFAULT_BATCHED_TOKENS = 32768
DCA_DEFAULT_MAX_MODEL_LEN = 1_048_576  # DCA runs far past the trained length


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_max_model_len(model: ModelConfig) -> int:
    if model.dca is not None:
        return max(model.max_position_embeddings, DCA_DEFAULT_MAX_MODEL_LEN)
    return model.max_position_embeddings


CUDA_DEFAULT_BLOCK_SIZE = 128  # the Triton kernels' key tile: one page per tile
CPU_DEFAULT_BLOCK_SIZE = 64


def default_block_size(device: torch.device, dca: DCAConfig | None) -> int:
    """The preferred block size, halved until it divides DCA's chunk length (if it can)."""
    size = CUDA_DEFAULT_BLOCK_SIZE if device.type == "cuda" else CPU_DEFAULT_BLOCK_SIZE
    while dca is not None and dca.chunk_len % size and size > 16:
        size //= 2
    return size


def check_dca_block_size(dca: DCAConfig, block_size: int) -> None:
    # DCA chunk boundaries must fall on KV-block boundaries (kernels handle a block as a unit).
    if dca.chunk_len % block_size:
        raise ConfigError(
            f"DCA chunk_len = chunk_size - local_size = {dca.chunk_size} - {dca.local_size} = "
            f"{dca.chunk_len} is not a multiple of the KV block_size ({block_size}); "
            "pick a block_size that divides it"
        )


def default_batched_tokens(device: torch.device, dca: DCAConfig | None, sparse: bool) -> int:
    """The prefill chunk length: with sparse prefill inside DCA on CUDA, one DCA chunk (when it
    is not much longer than the usual chunk), so that a prompt's chunks start on DCA chunk
    boundaries and each is one sparse segment: every segment pays an estimation against all
    cached keys and an index conversion, and 32K chunks over 24K DCA chunks make 1.75
    segments a chunk."""
    if device.type != "cuda":
        return CPU_DEFAULT_BATCHED_TOKENS
    if sparse and dca is not None and dca.chunk_len <= 2 * CUDA_DEFAULT_BATCHED_TOKENS:
        return dca.chunk_len
    return CUDA_DEFAULT_BATCHED_TOKENS


@dataclass(frozen=True)
class InFlight:
    step: LaunchedStep
    starts: tuple[int, ...]  # each sequence's num_computed_tokens when the step was scheduled


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig) -> None:
        self.checkpoint = checkpoint
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.device = torch.device(config.device) if config.device else default_device()
        self.dtype = resolve_dtype(config.dtype, self.device, self.model_config.torch_dtype)
        if config.block_size is None:
            config = dataclasses.replace(
                config, block_size=default_block_size(self.device, self.model_config.dca)
            )
        if self.model_config.dca is not None:
            check_dca_block_size(self.model_config.dca, config.block_size)
        self.max_model_len = config.max_model_len or default_max_model_len(self.model_config)
        self.max_num_batched_tokens = config.max_num_batched_tokens or default_batched_tokens(
            self.device, self.model_config.dca, config.sparse is not None
        )
        self.runner = self._new_runner(
            self.model_config,
            config,
            checkpoint.weights,
            self.device,
            self.dtype,
            self.max_num_batched_tokens,
            self.max_model_len,
        )
        self.block_size = config.block_size
        self.cache_identity = cache_identity(
            self.model_config,
            self.runner.model,
            self.dtype,
            self.runner.kv_dtype,
            config.block_size,
            config.sparse,
        )
        root = self.cache_identity.root() if config.enable_prefix_caching else None
        self.scheduler = Scheduler(
            BlockManager(self.runner.num_blocks, config.block_size, prefix_root=root),
            config.max_num_seqs,
            self.max_num_batched_tokens,
        )
        self._ids = itertools.count()
        self._seqs: dict[str, Sequence] = {}
        self._default_gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.device.type == "cuda"
        )
        self._inflight: InFlight | None = None
        # Marks from other threads that unwind a prefill step between layers (see abort.py).
        self.abort_signal = AbortSignal()
        self.runner.abort_signal = self.abort_signal
        self.failed_batch: ScheduledBatch | None = None  # the batch whose launch last raised
        self.after_schedule: Callable[[], None] | None = None  # e.g. publish the queue gauges
        self._forks = PromptForks()
        # Cheap until a first structured request builds its tokenizer index.
        self._grammars = (
            GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
            if self.tokenizer is not None
            else None
        )

    def _new_runner(self, *args) -> ModelRunner:
        """The model runner (a pipeline-parallel engine swaps in its own)."""
        return ModelRunner(*args)

    # --- requests -------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this checkpoint has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
        share_prompt_with: str | None = None,
    ) -> str:
        """Validate and queue a request; raises a LongctxError (and queues nothing) if it
        cannot run. prompt_token_ids, if given, saves encoding the prompt again.
        share_prompt_with: the id of a queued request with the same prompt, whose prefill this
        one reuses (n > 1 sampling; see engine/forks.py)."""
        ids = prompt_token_ids if prompt_token_ids is not None else self.encode(prompt)
        self.check_fits(len(ids), params)
        self.check_params(params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        elif not params.greedy:
            gen = self._default_gen
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        seq = Sequence(
            request_id=rid,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids,
            params=params,
            max_model_len=self.max_model_len,
            detokenizer=detok,
            generator=gen,
        )
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)
        if params.structured_output is not None:
            seq.grammar = self.grammars().matcher(params.structured_output)
        leader = self._leader(share_prompt_with, ids)
        self._seqs[rid] = seq
        if leader is not None:
            self._forks.hold(leader, seq)
        else:
            self.scheduler.add(seq)
        return rid

    def _leader(self, request_id: str | None, prompt_ids: list[int]) -> Sequence | None:
        if request_id is None:
            return None
        leader = self._seqs.get(request_id)
        if leader is None or leader.prompt_token_ids != prompt_ids:
            raise ValueError(
                f"share_prompt_with: no running request {request_id!r} has this prompt"
            )
        return None if leader.is_finished else leader

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt == 0:
            raise PromptTooLongError("prompt is empty: give at least one token")
        if num_prompt >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {num_prompt} tokens, longer than the context limit of "
                f"{self.max_model_len} tokens (max_model_len) minus one generated token"
            )
        need = min(num_prompt + params.max_tokens, self.max_model_len)
        capacity = self.runner.kv_capacity_tokens
        if blocks_for(need, self.block_size) > self.runner.num_blocks:
            raise OutOfKVMemoryError(
                f"request needs KV cache for {need} tokens but the cache holds {capacity} tokens "
                "in all; raise kv_cache_gib (or gpu_memory_utilization), or shorten the prompt"
            )

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids within this model's vocabulary,
        a grammar this tokenizer can follow. Thread-safe (the server calls it off the engine
        thread)."""
        vocab = self.model_config.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise SamplingParamsError(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        if params.structured_output is not None:
            self.grammars().check(params.structured_output)

    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            raise StructuredOutputError("structured output needs a checkpoint with a tokenizer")
        return self._grammars

    def abort(self, request_id: str) -> None:
        self.abort_signal.clear(request_id)
        self._forks.drop(request_id)
        seq = self._seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None or bool(self._forks)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up and found in the prefix cache since start, blocks cached."""
        return self.scheduler.blocks.stats()

    # --- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs it completed.

        Synchronous: schedule, run, wait, update. Asynchronous (the default on CUDA): schedule
        and queue step t+1 first, then wait for step t and update from it (sampling, stop
        checks, detokenization), so that host work hides behind the device's work. Outputs then
        trail the device by one step, and a sequence that stops at step t has also been given a
        step t+1, whose token is dropped.
        """
        if self._forks:  # the last launch (whatever computed a leader's prompt) is queued
            self._forks.start_ready(self.scheduler, self.runner.kv_caches)
        batch = self.scheduler.schedule()
        self.failed_batch = None
        if self.after_schedule is not None:
            self.after_schedule()
        if not self.async_scheduling:
            launched = self._launch_guarded(batch, None) if batch is not None else None
            return self._complete(launched) if launched is not None else []
        done = self._inflight
        if batch is not None:
            # Until the launch succeeds: a failed or aborted launch changed no sequence, so
            # step t stands and the next step reads it back.
            launched = self._launch_guarded(batch, done)
            if launched is None:
                return []
            self._inflight = launched
        else:
            self._inflight = None
        try:
            outputs = self._complete(done) if done is not None else []
            if self._inflight is not None:
                # Grammar masks filled while step t was completed: queue t+1's sampling now.
                self._inflight.step.finish()
            return outputs
        except BaseException:
            self._drop(self._inflight)
            self._drop(done)
            self._inflight = None
            self.scheduler.blocks.forget_cached()  # blocks committed for those steps
            raise

    def _launch_guarded(self, batch: ScheduledBatch, prev: InFlight | None) -> InFlight | None:
        """The launched step, or None if an abort unwound it (StepAborted, see abort.py). A
        launch that raises leaves its batch in failed_batch: its requests are the suspects."""
        try:
            return self._launch(batch, prev=prev)
        except StepAborted:
            return None
        except BaseException:
            self.failed_batch = batch
            raise

    def _launch(self, batch: ScheduledBatch, prev: InFlight | None = None) -> InFlight:
        starts = tuple(s.num_computed_tokens for s in batch.seqs)
        launched = self.runner.launch(batch, prev.step if prev is not None else None)
        for j, i in enumerate(launched.sampling):
            seq = batch.seqs[i]
            seq.num_pending += 1
            seq.pending_row = j
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        return InFlight(launched, starts)

    def _complete(self, done: InFlight) -> list[RequestOutput]:
        result = done.step.result()
        outputs = []
        batch = done.step.batch
        for i, seq in enumerate(batch.seqs):
            sampled = result.token_ids[i] is not None
            if sampled:
                seq.num_pending -= 1
            if seq.is_finished:  # stopped (or aborted) while this step was in flight
                continue
            if result.prompt_logprobs[i] is not None:
                self._record_prompt_logprobs(seq, result.prompt_logprobs[i], done.starts[i])
            if sampled:
                self._append(seq, result.token_ids[i], result.logprobs[i])
            outputs.append(self._output(seq))
            if seq.is_finished:
                self._seqs.pop(seq.request_id, None)
        return outputs

    @staticmethod
    def _drop(step: InFlight | None) -> None:
        """Forget a step whose results will never be read (its requests are failed)."""
        if step is None:
            return
        for i in step.step.sampling:
            seq = step.step.batch.seqs[i]
            seq.num_pending = max(0, seq.num_pending - 1)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, lps: list[dict[int, float]], start: int) -> None:
        # After a preemption the prompt is recomputed: keep what was recorded the first time.
        known = len(seq.prompt_logprobs) - 1
        seq.prompt_logprobs.extend(lps[max(0, known - start) :])

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        produced = len(seq.token_ids) - seq.num_prompt_tokens
        params = seq.params
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(token)
        reason = None
        if produced >= params.min_tokens:
            if not params.ignore_eos and token in self._eos_ids():
                reason = "stop"
            elif token in params.stop_token_ids:
                reason = "stop"
            elif params.stop and self._cut_stop_string(seq):
                reason = "stop"
        if reason is None and (
            produced >= params.max_tokens or len(seq.token_ids) >= seq.max_model_len
        ):
            reason = "length"
        if reason is not None:
            if reason == "length" and seq.detokenizer is not None:
                seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq, reason)

    def _eos_ids(self) -> tuple[int, ...]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return self.tokenizer.eos_token_ids
        return self.model_config.eos_token_ids

    @staticmethod
    def _cut_stop_string(seq: Sequence) -> bool:
        # Only the tail can contain a new match: the last token added at most len(text) chars.
        window = max(len(s) for s in seq.params.stop) + 64
        start = max(0, len(seq.text) - window)
        hits = [p for s in seq.params.stop if (p := seq.text.find(s, start)) >= 0]
        if not hits:
            return False
        seq.text = seq.text[: min(hits)]
        return True

    def _output(self, seq: Sequence) -> RequestOutput:
        hold = 0 if seq.is_finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        visible = max(seq.streamed_chars, len(seq.text) - hold)
        new_text = seq.text[seq.streamed_chars : visible]
        seq.streamed_chars = visible
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text,
            new_text=new_text,
            token_ids=list(seq.output_token_ids),
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=(
                list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None
            ),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_computed_prompt_tokens=min(seq.num_computed_tokens, seq.num_prompt_tokens),
            num_cached_tokens=seq.num_cached_tokens or 0,
        )
