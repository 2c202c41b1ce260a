import dataclasses

import pytest

from longctx.config import DCAConfig, ModelConfig
from longctx.errors import ConfigError
from longctx.layers.attention.dca_backend import DCAAttentionBackend
from longctx.layers.attention.registry import make_backend, triton_head_dims
from longctx.layers.attention.torch_backend import TorchAttentionBackend


def config(head_dim: int) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2",
        vocab_size=32,
        hidden_size=2 * head_dim,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
    )


def test_auto_on_cuda_falls_back_to_pytorch_for_head_sizes_without_kernels():
    assert 8 not in triton_head_dims() and {64, 128} <= triton_head_dims()
    assert type(make_backend("auto", config(8), "cuda")) is TorchAttentionBackend
    assert type(make_backend("auto", config(64), "cpu")) is TorchAttentionBackend


def test_triton_named_for_an_unsupported_head_size_is_a_config_error():
    with pytest.raises(ConfigError, match="head_dim 8"):
        make_backend("triton", config(8), "cuda")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ConfigError, match="available: torch, dca"):
        make_backend("flash9", config(64), "cpu")


def test_dca_models_get_the_dca_backend_off_cuda():
    cfg = dataclasses.replace(config(64), dca=DCAConfig(32, 8, original_max_position_embeddings=32))
    assert type(make_backend("auto", cfg, "cpu")) is DCAAttentionBackend
