"""Configuration dataclasses.

`ModelConfig` describes the network (translated once from a Hugging Face config.json or GGUF
metadata); `EngineConfig` describes how the engine runs it (cache, batching, device). Numbers only
known at run time (how many KV blocks fit) live in the engine, not here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from longctx.errors import ConfigError

if TYPE_CHECKING:
    from longctx.sparse.config import SparseConfig

SUPPORTED_ARCHITECTURES = ("qwen2", "llama")

_HF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}


@dataclass(frozen=True)
class DCAConfig:
    """Dual Chunk Attention settings (Qwen2.5-1M `dual_chunk_attention_config`).

    chunk_size C, local_size W; chunk_len c = C - W is the span of one DCA chunk.
    """

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.local_size <= 0:
            raise ConfigError(
                f"DCA chunk_size ({self.chunk_size}) and local_size ({self.local_size}) "
                "must be positive"
            )
        if self.local_size >= self.chunk_size:
            raise ConfigError(
                f"DCA local_size ({self.local_size}) must be smaller than chunk_size "
                f"({self.chunk_size})"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("DCA original_max_position_embeddings must be positive")

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], default_original: int) -> DCAConfig:
        try:
            return cls(
                chunk_size=int(d["chunk_size"]),
                local_size=int(d["local_size"]),
                original_max_position_embeddings=int(
                    d.get("original_max_position_embeddings", default_original)
                ),
            )
        except KeyError as e:
            raise ConfigError(f"dual_chunk_attention_config lacks {e.args[0]!r}") from None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    dca: DCAConfig | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_dca(self, dca: DCAConfig | None) -> ModelConfig:
        return dataclasses.replace(self, dca=dca)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Translate a Hugging Face config.json dictionary."""
        d = _normalized_rope(d)
        arch = _architecture_of(d)
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            max_pos = int(d.get("max_position_embeddings", 32768))
            dca_raw = d.get("dual_chunk_attention_config")
            eos = d.get("eos_token_id")
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_tuple(eos),
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                dca=DCAConfig.from_hf(dca_raw, max_pos) if dca_raw else None,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json has an invalid value: {e}") from None


def _normalized_rope(d: dict[str, Any]) -> dict[str, Any]:
    """Move transformers >= 5's `rope_parameters` to the top-level keys `from_hf` reads.

    transformers 5 saves rope_theta inside {"rope_parameters": {"rope_theta", "rope_type"}};
    older files have top-level rope_theta and rope_scaling. A scaled RoPE (yarn, linear, llama3)
    is refused rather than silently run unscaled.
    """
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope settings must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (only unscaled RoPE)")
    if "rope_theta" not in d and "rope_theta" in rope:
        return {**d, "rope_theta": rope["rope_theta"]}
    return d


def _architecture_of(d: dict[str, Any]) -> str:
    for name in d.get("architectures") or ():
        if name in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[name]
    model_type = d.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    found = d.get("architectures") or model_type
    raise ConfigError(
        f"unsupported model architecture {found!r} (supported: Qwen2ForCausalLM, LlamaForCausalLM)"
    )


def _as_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """'auto': float32 on the CPU (no fast bf16 there), the checkpoint's half type on GPU."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16
    if name not in _DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


# KV-cache storage: "auto" = the compute dtype; "fp8" (= "fp8_e4m3"): float8_e4m3fn values
# with a float32 scale per token and kv head (longctx/layers/attention/kv_quant.py).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV cache stores k and v in."""
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}"
        )
    return compute_dtype if name == "auto" else torch.float8_e4m3fn


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model.

    max_num_batched_tokens bounds the tokens of one forward pass (prefill chunks plus decode
    tokens), hence activation memory, whatever the prompt length.
    kv_cache_gib: KV memory on the CPU; on CUDA, gpu_memory_utilization of the free memory
    (after weights) goes to the cache unless kv_cache_gib is given.
    kv_cache_dtype: "auto" (the compute dtype) or "fp8" / "fp8_e4m3" (e4m3 values with a
    float32 scale per token and kv head: about half the memory, so twice the tokens).
    """

    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int | None = None  # None: 128 on CUDA (the tuned kernel tile), 64 on the CPU
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str | None = None
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode
    # Queue step t+1 before waiting for step t (longctx.engine.llm_engine); None: on for CUDA.
    async_scheduling: bool | None = None
    seed: int = 0
    sparse: SparseConfig | None = None  # sparse prefill (longctx.sparse); None: dense
    # Share computed full KV blocks between requests with a common prefix
    # (longctx/engine/prefix_cache.py).
    enable_prefix_caching: bool = True
    # Pipeline parallelism (longctx/distributed): stages on as many devices (or processes).
    pipeline_parallel_size: int = 1
    pipeline_chunking: str = "dcpp"  # prefill chunk lengths there: "fixed" or "dcpp"
    pipeline_timeout_s: float = 1800.0  # a stage silent this long on a micro-batch fails

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            self.block_size <= 0 or self.block_size & (self.block_size - 1)
        ):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ConfigError("max_num_seqs must be positive")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ConfigError("max_num_batched_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError("max_model_len must be positive")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError("kv_cache_gib must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)  # refuses unknown names
        if self.pipeline_parallel_size < 1:
            raise ConfigError("pipeline_parallel_size must be at least 1")
        if self.pipeline_chunking not in ("fixed", "dcpp"):
            raise ConfigError(
                f"pipeline_chunking must be fixed or dcpp, got {self.pipeline_chunking!r}"
            )
        if self.pipeline_timeout_s <= 0:
            raise ConfigError("pipeline_timeout_s must be positive")
