"""What a loaded checkpoint is, whatever its file format, and how a path picks the loader.

A `Checkpoint` carries the model config, the tokenizer and a `weights()` callable that streams
(name, tensor) pairs under Hugging Face Qwen2 names in HF layout ([out_features, in_features]).
Streaming one tensor at a time lets the model copy each into place before the next is read, so
a 14B checkpoint never sits in RAM twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.config import ModelConfig
from longctx.errors import ModelLoadError
from longctx.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"

WeightStream = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer | None
    source: str  # the path the checkpoint came from, for messages
    weights: WeightStream | None  # each call opens a fresh stream; None: random weights


def load_checkpoint(path: str | os.PathLike[str] | None) -> Checkpoint:
    """Load a Hugging Face directory or a GGUF file; None loads the default model."""
    # Imported here because hf_dir and gguf_file build `Checkpoint`s, so they import this module.
    from longctx.loading.default_model import default_model_path
    from longctx.loading.gguf_file import load_gguf
    from longctx.loading.hf_dir import load_hf_dir

    resolved = default_model_path(fetch=True) if path is None else Path(path).expanduser()
    if resolved.is_dir():
        return load_hf_dir(resolved)
    if not resolved.exists():
        raise ModelLoadError(f"model path not found: {resolved}")
    if resolved.suffix.lower() == ".gguf" or _has_gguf_magic(resolved):
        return load_gguf(resolved)
    raise ModelLoadError(f"{resolved}: not a model directory (with config.json) or a GGUF file")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None


def expected_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor the model needs, in Hugging Face Qwen2 / Llama naming."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        names.extend(_layer_tensor_names(i, config.attention_bias))
    return names


def _layer_tensor_names(i: int, attention_bias: bool) -> list[str]:
    p = f"model.layers.{i}"
    names = [f"{p}.self_attn.{proj}_proj.weight" for proj in ("q", "k", "v", "o")]
    if attention_bias:
        names += [f"{p}.self_attn.{proj}_proj.bias" for proj in ("q", "k", "v")]
    names += [f"{p}.mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")]
    names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    return names


def check_tensor_names(available: Iterable[str], config: ModelConfig, source: str) -> set[str]:
    """The needed names; raises ModelLoadError naming the first one the checkpoint lacks."""
    needed = expected_tensor_names(config)
    have = set(available)
    missing = [n for n in needed if n not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: checkpoint lacks tensor {missing[0]}{more}")
    return set(needed)
