"""Engine defaults that depend on the device and the attention settings."""

from __future__ import annotations

import torch

from longctx.config import DCAConfig
from longctx.engine.llm_engine import (
    CPU_DEFAULT_BATCHED_TOKENS,
    CUDA_DEFAULT_BATCHED_TOKENS,
    default_batched_tokens,
)

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_sparse_dca_chunks_follow_dca_chunks_on_cuda():
    small = DCAConfig(chunk_size=32768, local_size=8192, original_max_position_embeddings=32768)
    big = DCAConfig(chunk_size=262144, local_size=8192, original_max_position_embeddings=262144)
    assert default_batched_tokens(CUDA, small, sparse=True) == 24576
    assert default_batched_tokens(CUDA, small, sparse=False) == CUDA_DEFAULT_BATCHED_TOKENS
    assert default_batched_tokens(CUDA, big, sparse=True) == CUDA_DEFAULT_BATCHED_TOKENS
    assert default_batched_tokens(CUDA, None, sparse=True) == CUDA_DEFAULT_BATCHED_TOKENS
    assert default_batched_tokens(CPU, small, sparse=True) == CPU_DEFAULT_BATCHED_TOKENS
