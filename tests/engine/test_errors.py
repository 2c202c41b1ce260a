"""Bad requests get a LongctxError naming the problem and leave other requests untouched."""

import pytest

from longctx import LLM, SamplingParams
from longctx.errors import ConfigError, OutOfKVMemoryError, PromptTooLongError, SamplingParamsError
from tests.hf_reference import checkpoint_of, tiny_hf_model


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=5)


def make(hf, **kw):
    kw.setdefault("kv_cache_gib", 0.01)
    kw.setdefault("block_size", 16)
    kw.setdefault("dtype", "float32")
    return LLM(checkpoint=checkpoint_of(hf), device="cpu", **kw)


def test_prompt_longer_than_context_limit(hf):
    llm = make(hf, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="64"):
        llm.generate([list(range(64))], SamplingParams(max_tokens=1))


def test_empty_prompt(hf):
    with pytest.raises(PromptTooLongError, match="empty"):
        make(hf).generate([[]], SamplingParams(max_tokens=1))


def test_kv_cache_too_small_for_request(hf):
    llm = make(hf, kv_cache_gib=4 * 8192 / 2**30)  # 4 blocks of 16 tokens
    with pytest.raises(OutOfKVMemoryError, match="KV cache"):
        llm.generate([list(range(100))], SamplingParams(max_tokens=1))


def test_kv_budget_below_one_block(hf):
    with pytest.raises(OutOfKVMemoryError, match="kv_cache_gib"):
        make(hf, kv_cache_gib=1e-9)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.5),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_tokens=0),
        dict(logprobs=-2),
        dict(stop=("",)),
    ],
)
def test_invalid_sampling_params(kw):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw", [dict(block_size=24), dict(max_num_seqs=0), dict(dtype="int8")])
def test_invalid_engine_config(hf, kw):
    with pytest.raises(ConfigError):
        make(hf, **kw)


def test_bad_request_in_a_batch_queues_nothing(hf):
    llm = make(hf, max_model_len=64)
    with pytest.raises(PromptTooLongError):
        llm.generate([[1, 2, 3], list(range(80))], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].token_ids) == 2


def test_rejected_request_does_not_disturb_one_in_flight(hf):
    llm = make(hf, max_model_len=64)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = llm.generate([[5, 6, 7]], params)[0].token_ids
    rid = llm.engine.add_request([5, 6, 7], params)
    llm.engine.step()
    with pytest.raises(PromptTooLongError):
        llm.engine.add_request(list(range(100)), params)
    done = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done[rid].token_ids == expected
