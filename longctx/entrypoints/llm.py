"""Offline Python API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from tqdm import tqdm

from longctx.config import DCAConfig, EngineConfig
from longctx.distributed.engine import make_engine
from longctx.engine.outputs import RequestOutput
from longctx.engine.saved_kv import DEFAULT_SHARD_BYTES, SavedKV, load_kv, save_kv
from longctx.errors import ConfigError
from longctx.loading import random_checkpoint
from longctx.loading.checkpoint import Checkpoint, load_checkpoint
from longctx.sampling_params import SamplingParams
from longctx.sparse.config import SparseConfig, resolve_sparse_config

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """A model ready to generate.

    model: a Hugging Face directory, a .gguf file, or None for the default model.
    random_weights: take only the architecture from `model` (a directory, a config.json or a
    built-in config name such as "qwen2.5-7b-instruct-1m") and draw the weights at random.
    dca: turn Dual Chunk Attention on for a model whose config.json lacks it.
    sparse: sparse prefill (MInference vertical-slash): a SparseConfig, a pattern file path,
    "default" (default budgets), False (off) or None (on if the model directory has a
    sparse_attention_config.json or the config.json sparse_attention_* keys).
    load_kv: saved KV directories (`LLM.save_kv`, `longctx prefill --save-kv`) to put into the
    prefix cache at start.
    Other keyword arguments are EngineConfig fields (max_model_len, max_num_batched_tokens,
    kv_cache_gib, block_size, device, enable_prefix_caching, ...).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype: str = "auto",
        *,
        checkpoint: Checkpoint | None = None,
        dca: DCAConfig | None = None,
        sparse: SparseConfig | str | os.PathLike | bool | None = None,
        random_weights: bool = False,
        load_kv: str | os.PathLike | Sequence[str | os.PathLike] = (),
        **engine_kwargs,
    ) -> None:
        if checkpoint is not None:
            ckpt = checkpoint
        elif random_weights:
            if model is None:
                raise ConfigError("random_weights needs model= a config name, file or directory")
            ckpt = random_checkpoint(str(model))
        else:
            ckpt = load_checkpoint(model)
        if dca is not None:
            ckpt = dataclasses.replace(ckpt, config=ckpt.config.with_dca(dca))
        sparse_config = resolve_sparse_config(sparse, model if checkpoint is None else None)
        self.engine = make_engine(
            ckpt, EngineConfig(dtype=dtype, sparse=sparse_config, **engine_kwargs)
        )
        for directory in [load_kv] if isinstance(load_kv, str | os.PathLike) else load_kv:
            self.load_kv(directory)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order (with n > 1, the
        n outputs of a prompt one after another).

        Each prompt is a string or a list of token ids. All prompts are validated before any
        work starts, so one bad prompt leaves nothing queued. on_output sees every step's
        update (for streaming).
        """
        prompts = _as_prompt_list(prompts)
        plist = _as_params_list(params, len(prompts))
        token_ids = [self.engine.encode(p) for p in prompts]
        for toks, sp in zip(token_ids, plist):
            self.engine.check_fits(len(toks), sp)
            self.engine.check_params(sp)
        ids = []
        for p, sp, toks in zip(prompts, plist, token_ids):
            ids.extend(self._add(p, sp, toks))
        final: dict[str, RequestOutput] = {}
        bar = _PrefillProgress(sum(map(len, token_ids))) if use_tqdm else None
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if bar is not None:
                        bar.update(out)
                    if on_output is not None:
                        on_output(out)
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in ids]

    def save_kv(
        self,
        prompt: Prompt,
        directory: str | os.PathLike,
        *,
        use_tqdm: bool = False,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> SavedKV:
        """Prefill prompt (a document; its cached blocks are reused) and write the KV of its
        full blocks to directory, in shards of at most shard_bytes."""
        ids = self.engine.encode(prompt)
        self.generate([ids], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=use_tqdm)
        return save_kv(self.engine, ids, directory, shard_bytes=shard_bytes, progress=use_tqdm)

    def load_kv(self, directory: str | os.PathLike, *, use_tqdm: bool = False) -> SavedKV:
        """Put saved KV into the prefix cache: a prompt that starts with the saved document
        then skips its prefill. Raises SavedKVError if it was made with another model or
        settings, or a file is missing, truncated or corrupt."""
        return load_kv(self.engine, directory, progress=use_tqdm)

    def _add(self, prompt: Prompt, params: SamplingParams, token_ids: list[int]) -> list[str]:
        """Queue params.n sequences of one prompt; all but the first reuse its prefill."""
        first = self.engine.add_request(prompt, params.for_choice(0), prompt_token_ids=token_ids)
        return [first] + [
            self.engine.add_request(
                prompt, params.for_choice(i), prompt_token_ids=token_ids, share_prompt_with=first
            )
            for i in range(1, params.n)
        ]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if self.tokenizer is None:
            raise ConfigError("this checkpoint has no tokenizer, so no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(list(c)) for c in convs]
        return self.generate(prompts, params, **kwargs)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)


class _PrefillProgress:
    """tqdm bar on stderr over prompt tokens prefilled: tokens done, tokens/s, ETA."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(
            total=total,
            unit="tok",
            desc="prefill",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )
        self.done: dict[str, int] = {}

    def update(self, out: RequestOutput) -> None:
        self.done[out.request_id] = out.num_computed_prompt_tokens
        self.bar.update(sum(self.done.values()) - self.bar.n)

    def close(self) -> None:
        self.bar.close()
