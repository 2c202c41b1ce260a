"""Qwen2 / Llama decoder-only transformer (RMSNorm, GQA attention, SwiGLU MLP).

The model knows nothing about scheduling or caching: attention goes through the backend in the
ForwardContext it is given. Input is a flat batch of tokens [T] from any number of sequences.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from longctx.config import ModelConfig
from longctx.errors import ModelLoadError
from longctx.layers.attention import ForwardContext, SelfAttention
from longctx.layers.mlp import GatedMLP
from longctx.layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            bias=config.attention_bias,
            layer_idx=layer_idx,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if ctx.before_layer is not None:
                ctx.before_layer()
            x = layer(x, ctx)
        return self.norm(x)


# Checkpoint tensor name suffix -> (our fused parameter, shard index).
_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat token batch."""
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the rows whose next token is wanted (not the whole prompt)."""
        return self.lm_head(hidden).float()

    def _shard_sizes(self, fused: str) -> tuple[int, ...]:
        c = self.config
        if fused == "qkv_proj":
            return (c.q_size, c.kv_size, c.kv_size)
        return (c.intermediate_size, c.intermediate_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, packing q/k/v and gate/up; every parameter must
        be covered exactly once, else a ModelLoadError names what is missing or unexpected."""
        params = dict(self.named_parameters(remove_duplicate=True))
        pending: dict[str, int] = {n: 1 for n in params}
        for fused in ("qkv_proj", "gate_up_proj"):
            for n in params:
                if f".{fused}." in n:
                    pending[n] = len(self._shard_sizes(fused))
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            target, sl = self._locate(name)
            if target not in params:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
            dest = params[target].data if sl is None else params[target].data[sl]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            pending[target] -= 1
        missing = [n for n, left in pending.items() if left > 0]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")

    def _locate(self, name: str) -> tuple[str, slice | None]:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in _PACKED:
                fused, shard = _PACKED[part]
                sizes = self._shard_sizes(fused)
                start = sum(sizes[:shard])
                target = ".".join(parts[:i] + [fused] + parts[i + 1 :])
                return target, slice(start, start + sizes[shard])
        return name, None


def init_random_weights(model: Qwen2ForCausalLM, seed: int, std: float = 0.02) -> None:
    """Random weights for speed work (speed does not depend on values), made on the model's
    device so a 14B model never passes through host memory."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
