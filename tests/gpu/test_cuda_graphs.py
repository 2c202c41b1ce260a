"""Decode through CUDA graphs equals eager decode (CUDA only)."""

import pytest

from longctx import LLM, DCAConfig, SamplingParams
from tests.engine.test_vs_transformers import random_prompts
from tests.hf_reference import checkpoint_of, tiny_hf_model


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=21, head_dim=16)


def run(hf, eager: bool, dca=None, dtype="float32", kv="auto"):
    llm = LLM(
        checkpoint=checkpoint_of(hf),
        dtype=dtype,
        device="cuda",
        block_size=16,
        kv_cache_gib=0.05,
        max_num_batched_tokens=64,
        attention_backend="triton",
        enforce_eager=eager,
        dca=dca,
        max_num_seqs=8,
        kv_cache_dtype=kv,
    )
    assert (llm.engine.runner.graphs is None) == eager
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    return llm.generate(random_prompts([3, 40, 17], seed=4), params)  # batch 3 -> bucket 4


@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("dca", [None, DCAConfig(40, 8, 16)], ids=["dense", "dca"])
def test_graph_decode_equals_eager(hf, dca, kv):
    """With an fp8 cache too: its scales are static tensors beside the cache, and the
    quantizing write is captured like the plain one."""
    graph, eager = run(hf, False, dca, kv=kv), run(hf, True, dca, kv=kv)
    for g, e in zip(graph, eager):
        assert g.token_ids == e.token_ids
        for a, b in zip(g.logprobs, e.logprobs):
            ((tok, val),) = a.items()
            assert abs(val - b[tok]) < 1e-4
