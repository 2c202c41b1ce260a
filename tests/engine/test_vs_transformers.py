"""The whole engine against transformers' Qwen2 on tiny random models, float32."""

import pytest
import torch

from longctx import LLM, SamplingParams
from tests.conftest import device_under_test
from tests.hf_reference import checkpoint_of, hf_greedy, hf_logprobs, tiny_hf_model

TOL = 1e-4
DEV = device_under_test()


def make_llm(hf, **kw) -> LLM:
    kw.setdefault("device", str(DEV))
    kw.setdefault("block_size", 16)
    kw.setdefault("kv_cache_gib", 0.05)
    return LLM(checkpoint=checkpoint_of(hf), dtype="float32", **kw)


def random_prompts(lengths, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf(request):
    return tiny_hf_model(seed=1, tie=request.param)


@pytest.mark.parametrize("chunk", [7, 16, 33, 1000])
def test_prompt_logprobs_match_for_every_chunk_size(hf, chunk):
    prompts = random_prompts([1, 15, 16, 17, 48, 100])  # around block boundaries of 16
    llm = make_llm(hf, max_num_batched_tokens=chunk)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    for ids, out in zip(prompts, outs):
        ref = hf_logprobs(hf, ids)
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(ids)
        for p in range(1, len(ids)):
            got = out.prompt_logprobs[p][ids[p]]
            assert abs(got - ref[p - 1, ids[p]].item()) < TOL, (chunk, len(ids), p)


@pytest.mark.parametrize("chunk", [5, 64, 4096])
def test_greedy_20_steps_tokens_and_logprobs(hf, chunk):
    prompts = random_prompts([3, 16, 31, 70], seed=2)
    llm = make_llm(hf, max_num_batched_tokens=chunk)
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, ids, 20)
        full = hf_logprobs(hf, ids + out.token_ids)
        for step, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
            row = full[len(ids) - 1 + step]
            assert abs(lps[tok] - row[tok].item()) < TOL
            top = row.topk(3).indices.tolist()
            assert set(top) <= set(lps)
        assert out.finish_reason == "length"


def test_batch_equals_one_at_a_time(hf):
    prompts = random_prompts([5, 40, 17, 2, 64], seed=3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    batched = make_llm(hf, max_num_batched_tokens=32).generate(prompts, params)
    single = make_llm(hf)
    for ids, out in zip(prompts, batched):
        assert single.generate([ids], params)[0].token_ids == out.token_ids


def test_preemption_under_tiny_cache_keeps_results(hf):
    prompts = random_prompts([30, 30, 30, 30], seed=4)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0)
    roomy = make_llm(hf).generate(prompts, params)
    # 7 blocks of 16 tokens: any two sequences together overflow it and force preemption.
    bytes_per_block = 2 * 2 * 2 * 16 * 16 * 4
    tight = make_llm(hf, kv_cache_gib=7 * bytes_per_block / 2**30).generate(prompts, params)
    for a, b in zip(roomy, tight):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x[next(iter(x))] - y[next(iter(x))]) < TOL
