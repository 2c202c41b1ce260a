"""The clamped-RoPE baseline backend on a tiny transformers Qwen2, float32."""

import dataclasses

import pytest
import torch

from longctx import LLM, SamplingParams
from longctx.layers.attention import BatchLayout
from longctx.layers.attention.clamped_rope_backend import ClampedRopeBackend
from tests.hf_reference import checkpoint_of, hf_logprobs, tiny_hf_model


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=7)


def make_llm(hf, backend: str, trained: int | None = None, **kw) -> LLM:
    ckpt = checkpoint_of(hf)
    if trained is not None:
        ckpt = dataclasses.replace(
            ckpt, config=dataclasses.replace(ckpt.config, max_position_embeddings=trained)
        )
    return LLM(
        checkpoint=ckpt,
        dtype="float32",
        device="cpu",
        attention_backend=backend,
        block_size=16,
        kv_cache_gib=0.05,
        max_model_len=256,
        **kw,
    )


def run(llm, ids, max_tokens=8):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=0)
    out = llm.generate([ids], params)[0]
    lps = [out.prompt_logprobs[p][ids[p]] for p in range(1, len(ids))]
    return lps, out.token_ids


PROMPT = torch.randint(1, 320, (90,), generator=torch.Generator().manual_seed(0)).tolist()


def test_positions_are_clamped_at_the_trained_length(hf):
    llm = make_llm(hf, "rope-clamp", trained=40)
    backend = llm.engine.runner.backend
    assert isinstance(backend, ClampedRopeBackend)
    meta = backend.prepare(BatchLayout((60,), (60,), ((0, 1, 2, 3),), 16), torch.device("cpu"))
    want = backend.rope.cos_sin(torch.arange(60).clamp(max=39))
    assert torch.equal(meta.cos, want[0]) and torch.equal(meta.sin, want[1])


def test_within_the_trained_length_it_is_plain_rope(hf):
    lps, toks = run(make_llm(hf, "rope-clamp"), PROMPT)
    ref = hf_logprobs(hf, PROMPT)
    want = [ref[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))]
    assert max(abs(a - b) for a, b in zip(lps, want)) < 1e-4
    assert toks == run(make_llm(hf, "torch"), PROMPT)[1]


def test_past_the_limit_the_model_changes_and_before_it_does_not(hf):
    # prefilled in chunks of 32 and decoded: cached keys and decode queries are clamped alike
    clamped, _ = run(make_llm(hf, "rope-clamp", trained=40, max_num_batched_tokens=32), PROMPT)
    plain, _ = run(make_llm(hf, "torch"), PROMPT)
    # prompt logprob p-1 is the prediction made at position p - 1
    early = max(abs(a - b) for a, b in zip(clamped[:39], plain[:39]))
    late = max(abs(a - b) for a, b in zip(clamped[45:], plain[45:]))
    assert early < 1e-4 and late > 1e-2
