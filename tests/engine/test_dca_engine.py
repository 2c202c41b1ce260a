"""DCA through the whole engine on a tiny transformers Qwen2, float32."""

import pytest
import torch

from longctx import LLM, SamplingParams
from longctx.config import DCAConfig
from longctx.errors import ConfigError
from longctx.layers.attention.dca_backend import DCAAttentionBackend
from tests.hf_reference import checkpoint_of, hf_greedy, hf_logprobs, tiny_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=5)


def make_llm(hf, dca: DCAConfig, **kw) -> LLM:
    kw.setdefault("block_size", 16)
    kw.setdefault("kv_cache_gib", 0.05)
    return LLM(checkpoint=checkpoint_of(hf), dca=dca, dtype="float32", device="cpu", **kw)


def random_prompts(lengths, vocab=320, seed=0):
    # Token 0 is left out: hf_greedy passes pad_token_id=0, and transformers' generate then
    # masks prompt tokens equal to 0 out of attention.
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def prompt_logprobs(llm: LLM, prompts, max_tokens: int = 1):
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, prompt_logprobs=0, ignore_eos=True
    )
    outs = llm.generate(prompts, params)
    lps = [
        [out.prompt_logprobs[p][ids[p]] for p in range(1, len(ids))]
        for ids, out in zip(prompts, outs, strict=True)
    ]
    return lps, [out.token_ids for out in outs]


# C = 1024 holds every prompt in one DCA chunk; C = 128, W = 16 (c = 112) puts the last tokens of
# 100 + 20 in a second chunk (successive part) yet stays exact, since length <= C and c > W.
@pytest.mark.parametrize("chunk_size,local_size", [(1024, 64), (128, 16)])
def test_chunk_covering_the_sequence_matches_transformers(hf, chunk_size, local_size):
    dca = DCAConfig(chunk_size, local_size, original_max_position_embeddings=4096)
    llm = make_llm(hf, dca, max_num_batched_tokens=33)
    assert isinstance(llm.engine.runner.backend, DCAAttentionBackend)
    prompts = random_prompts([1, 17, 48, 100])
    lps, tokens = prompt_logprobs(llm, prompts, max_tokens=20)
    for ids, got, toks in zip(prompts, lps, tokens, strict=True):
        ref = hf_logprobs(hf, ids)
        want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0) < TOL
        assert toks == hf_greedy(hf, ids, 20)


def test_small_chunks_give_the_same_results_for_every_batching(hf):
    # c = 24: the 100-token prompt spans five DCA chunks; YaRN is on past 32 tokens.
    dca = DCAConfig(chunk_size=32, local_size=8, original_max_position_embeddings=32)
    prompts = random_prompts([100, 37, 5, 60], seed=1)
    runs = [
        prompt_logprobs(
            make_llm(hf, dca, block_size=8, max_num_batched_tokens=n), prompts, max_tokens=12
        )
        for n in (7, 24, 50, 4096)
    ]
    base_lps, base_tokens = runs[0]
    for lps, tokens in runs[1:]:
        assert tokens == base_tokens
        for a, b in zip(lps, base_lps, strict=True):
            # float32 noise: the plain torch backend moves these logprobs by 1.1e-5 across
            # batchings too; a DCA mistake moves them by > 1e-2.
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 5e-5
    # DCA is really on: past the first chunk the logprobs leave the stock model's.
    ref = hf_logprobs(hf, prompts[0])
    far = [abs(base_lps[0][p - 1] - ref[p - 1, prompts[0][p]].item()) for p in range(50, 100)]
    assert max(far) > 1e-2


def test_default_max_model_len_with_dca(hf):
    dca = DCAConfig(32, 8, 32)
    assert make_llm(hf, dca, block_size=8).engine.max_model_len == 1_048_576
    assert make_llm(hf, dca, block_size=8, max_model_len=500).engine.max_model_len == 500


def test_invalid_dca_settings():
    with pytest.raises(ConfigError, match="local_size"):
        DCAConfig(chunk_size=32, local_size=32, original_max_position_embeddings=32)
    with pytest.raises(ConfigError, match="multiple of the KV block_size"):
        make_llm(tiny_hf_model(seed=5), DCAConfig(32, 8, 32), block_size=16)  # c = 24
