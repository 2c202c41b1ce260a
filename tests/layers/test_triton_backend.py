"""The Triton backend (interpreter on the CPU) through the whole engine against the PyTorch
backends on a tiny transformers model: prefill in chunks, mixed and decode-only steps, DCA."""

import pytest

from longctx import LLM, DCAConfig, SamplingParams
from tests.engine.test_vs_transformers import random_prompts
from tests.hf_reference import checkpoint_of, tiny_hf_model


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=11, head_dim=16)


def run(hf, backend, dca=None, chunk=16, kv="auto"):
    llm = LLM(
        checkpoint=checkpoint_of(hf),
        dtype="float32",
        device="cpu",
        block_size=8,
        kv_cache_gib=0.01,
        max_num_batched_tokens=chunk,
        attention_backend=backend,
        dca=dca,
        kv_cache_dtype=kv,
    )
    params = SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0, logprobs=0
    )
    return llm.generate(random_prompts([37, 5], seed=9), params)


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.prompt_logprobs[1:] + x.logprobs, y.prompt_logprobs[1:] + y.logprobs):
            ((tok, val),) = lx.items()
            assert abs(val - ly[tok]) < 1e-4


def test_dense_matches_torch_backend(hf):
    assert_same(run(hf, "triton"), run(hf, "torch"))


def test_dca_matches_pytorch_dca_backend(hf):
    dca = DCAConfig(chunk_size=24, local_size=8, original_max_position_embeddings=12)
    assert_same(run(hf, "triton", dca), run(hf, "dca", dca))


def test_fp8_cache_matches_pytorch_backends(hf):
    """An fp8 cache: the kernels' folded scales against the PyTorch backends' dequantized
    gathers. Both attend over the same dequantized values, so only float32 rounding differs
    (measured max |logprob diff| 7.6e-6 dense, 1e-6 on a model of weight std 0.05)."""
    assert_same(run(hf, "triton", kv="fp8"), run(hf, "torch", kv="fp8"))
    dca = DCAConfig(chunk_size=24, local_size=8, original_max_position_embeddings=12)
    assert_same(run(hf, "triton", dca, kv="fp8"), run(hf, "dca", dca, kv="fp8"))
