"""Penalties, logit_bias and seeds through the engine: greedy decoding with penalties equals a
plain loop over transformers' logits with the penalties applied by hand, and a seeded request
samples the same tokens alone and in any batch, synchronously or not."""

import pytest
import torch

from longctx import LLM, SamplingParams
from longctx.errors import SamplingParamsError
from tests.hf_reference import checkpoint_of, tiny_hf_model
from tests.layers.test_logits_processors import reference

PROMPT = [3, 17, 17, 42, 5, 99, 3]
STEPS = 32  # the plain greedy continuation of PROMPT repeats a token at step 27


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=2)


def make(hf, async_scheduling=False, **kw):
    return LLM(
        checkpoint=checkpoint_of(hf),
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.01,
        block_size=16,
        max_model_len=256,
        async_scheduling=async_scheduling,
        **kw,
    )


@pytest.fixture(scope="module")
def llm(hf):
    return make(hf)


@torch.no_grad()
def reference_greedy(hf, prompt, params, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        ids.append(int(reference(logits, prompt, ids[len(prompt) :], params).argmax()))
    return ids[len(prompt) :]


PENALIZED = [
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(frequency_penalty=1.5),
    SamplingParams(presence_penalty=2.0, logit_bias={7: 4.0}),
    SamplingParams(repetition_penalty=0.6, frequency_penalty=-0.5, presence_penalty=0.3),
]


@pytest.mark.parametrize("sp", PENALIZED)
def test_penalized_greedy_matches_the_reference_loop(hf, llm, sp):
    params = SamplingParams(
        temperature=0,
        max_tokens=STEPS,
        ignore_eos=True,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        logit_bias=sp.logit_bias,
    )
    out = llm.generate([PROMPT], params)[0]
    expected = reference_greedy(hf, PROMPT, params, STEPS)
    assert out.token_ids == expected
    # The case is not vacuous: this model's plain greedy output repeats within STEPS tokens.
    assert expected != reference_greedy(hf, PROMPT, SamplingParams(), STEPS)


def _seeded(seed, **kw):
    return SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=seed, **kw)


def _others():
    prompts = [[i % 300 for i in range(5, 5 + n)] for n in (3, 40, 9, 70)]
    params = [
        SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True),  # the shared stream
        _seeded(99, top_k=30),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        _seeded(5, frequency_penalty=0.5),
    ]
    return prompts, params


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("extra", [{}, {"presence_penalty": 1.0, "logit_bias": {9: 3.0}}])
def test_a_seeded_request_does_not_depend_on_the_batch(hf, llm, async_scheduling, extra):
    target = _seeded(1234, **extra)
    alone = llm.generate([PROMPT], target)[0].token_ids
    engine = make(hf, async_scheduling, max_num_batched_tokens=32)
    prompts, params = _others()
    for at in (0, 2, len(prompts)):  # the seeded request first, in the middle, last
        mixed = engine.generate(
            prompts[:at] + [PROMPT] + prompts[at:], params[:at] + [target] + params[at:]
        )
        assert mixed[at].token_ids == alone
    again = llm.generate([PROMPT], _seeded(1235, **extra))[0].token_ids
    assert again != alone  # the seed matters


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(SamplingParamsError, match="outside the vocabulary"):
        llm.generate([PROMPT], SamplingParams(logit_bias={320: 1.0}))
