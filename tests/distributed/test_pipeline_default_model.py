"""The default model (Qwen2.5-Coder-0.5B-Instruct GGUF) over two gloo stages gives what one
process gives, on short prompts."""

from __future__ import annotations

import pytest

from longctx import LLM, SamplingParams
from longctx.loading import default_model_path

PROMPTS = ["def quicksort(xs):", "The three primary colors are"]
ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, kv_cache_gib=0.1)
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def path():
    return default_model_path(fetch=True)


@pytest.fixture(scope="module")
def one(path):
    return LLM(path, max_num_batched_tokens=4, **ENGINE)


def test_two_stages_match_one_process(path, one):
    pp = LLM(path, max_num_batched_tokens=4, pipeline_parallel_size=2, **ENGINE)
    try:
        first, second = pp.engine.runner.spec.layers
        # Stage 0 also holds the LM head, worth several of this small model's layers.
        assert len(first) < len(second) and len(first) + len(second) == 24
        got = pp.generate(PROMPTS, PARAMS)
    finally:
        pp.engine.close()
    for a, b in zip(got, one.generate(PROMPTS, PARAMS), strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert max(abs(x[t] - y[t]) for t in y) < 1e-4
