"""Fixtures for the loading tests: the default model, and small GGUF files written on the fly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from longctx.loading.default_model import default_model_path
from longctx.loading.gguf_file import GGUFFile


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model (assembled on first use; cheap once cached)."""
    return default_model_path(fetch=True)


@pytest.fixture(scope="session")
def default_gguf_file(default_gguf: Path) -> GGUFFile:
    return GGUFFile.read(default_gguf)


@dataclass
class RawTensor:
    """Tensor bytes as a GGUF stores them, with the element shape in torch order."""

    data: np.ndarray
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType = GGMLQuantizationType.F32


@dataclass
class GGUFSpec:
    arch: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, RawTensor] = field(default_factory=dict)


def write_gguf(path: Path, spec: GGUFSpec) -> Path:
    """Write `spec` with gguf's own writer (typed keys: int -> u32, float -> f32)."""
    writer = GGUFWriter(str(path), spec.arch)
    for key, value in spec.metadata.items():
        _add_value(writer, key, value)
    for name, t in spec.tensors.items():
        if t.ggml_type == GGMLQuantizationType.F32:
            writer.add_tensor(name, t.data.view(np.float32).reshape(t.shape))
        else:  # the writer takes quantized rows as bytes: [..., bytes per row]
            raw = t.data.view(np.uint8).reshape(*t.shape[:-1], -1)
            writer.add_tensor(name, raw, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def f32(array: np.ndarray) -> RawTensor:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return RawTensor(array, array.shape)


def tiny_arch_metadata(
    arch: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, context: int = 4096
) -> dict[str, Any]:
    return {
        f"{arch}.block_count": layers,
        f"{arch}.context_length": context,
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
    }


def byte_vocab_metadata(vocab_size: int) -> dict[str, Any]:
    """A minimal byte-level vocabulary (no merges) so a GGUF has a tokenizer section."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = (alphabet + ["ĠĠ"] + [f"[PAD{i}]" for i in range(vocab_size)])[:vocab_size]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * vocab_size,
        "tokenizer.ggml.merges": ["Ġ Ġ"],
        "tokenizer.ggml.eos_token_id": 0,
    }


def random_dense_tensors(
    n_layers: int,
    hidden: int,
    ffn: int,
    q_size: int,
    kv_size: int,
    vocab: int,
    bias: bool,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights in HF layout ([out, in])."""

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"token_embd.weight": rand(vocab, hidden), "output_norm.weight": rand(hidden)}
    for i in range(n_layers):
        p = f"blk.{i}"
        tensors.update(
            {
                f"{p}.attn_q.weight": rand(q_size, hidden),
                f"{p}.attn_k.weight": rand(kv_size, hidden),
                f"{p}.attn_v.weight": rand(kv_size, hidden),
                f"{p}.attn_output.weight": rand(hidden, q_size),
                f"{p}.ffn_gate.weight": rand(ffn, hidden),
                f"{p}.ffn_up.weight": rand(ffn, hidden),
                f"{p}.ffn_down.weight": rand(hidden, ffn),
                f"{p}.attn_norm.weight": rand(hidden),
                f"{p}.ffn_norm.weight": rand(hidden),
            }
        )
        if bias:
            tensors.update(
                {
                    f"{p}.attn_q.bias": rand(q_size),
                    f"{p}.attn_k.bias": rand(kv_size),
                    f"{p}.attn_v.bias": rand(kv_size),
                }
            )
    return tensors


def tiny_qwen2_spec(
    rng: np.random.Generator, *, arch: str = "qwen2", drop: tuple[str, ...] = ()
) -> GGUFSpec:
    """A 2-layer Qwen2-shaped GGUF of random float32 weights (and a byte vocabulary)."""
    tensors = random_dense_tensors(2, 32, 64, 32, 16, 300, True, rng)
    metadata: Mapping[str, Any] = {
        **tiny_arch_metadata(arch, 2, 32, 64, heads=4, kv_heads=2),
        **byte_vocab_metadata(300),
    }
    return GGUFSpec(arch, dict(metadata), {n: f32(a) for n, a in tensors.items() if n not in drop})


class GGUFTools:
    """The helpers above, handed to tests as a fixture (conftest modules are not importable)."""

    RawTensor = RawTensor
    GGUFSpec = GGUFSpec
    write = staticmethod(write_gguf)
    f32 = staticmethod(f32)
    tiny_qwen2_spec = staticmethod(tiny_qwen2_spec)
    tiny_arch_metadata = staticmethod(tiny_arch_metadata)
    byte_vocab_metadata = staticmethod(byte_vocab_metadata)
    random_dense_tensors = staticmethod(random_dense_tensors)


@pytest.fixture(scope="session")
def gguf_tools() -> GGUFTools:
    return GGUFTools()
