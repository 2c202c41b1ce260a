"""Asynchronous scheduling (step t+1 queued before step t is read back) gives exactly what the
synchronous loop gives, and leaks nothing. On the CPU nothing overlaps, but every piece of the
bookkeeping (tokens taken from the previous step's device tensor, pending counts, the dropped
extra step of a sequence that stopped, preemption with a token in flight) runs the same way."""

import pytest

from longctx import LLM, SamplingParams
from tests.conftest import device_under_test, tiny_config_file

BLOCK = 16
BYTES_PER_BLOCK = 2 * 2 * 1 * 64 * 4 * BLOCK  # k+v, 2 layers, 1 kv head, head_dim 64, fp32


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    # head_dim 64: the Triton kernels run it on CUDA
    return tiny_config_file(
        tmp_path_factory.mktemp("tiny"),
        hidden_size=128,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def make(config_path, async_scheduling, blocks=64, **kw):
    return LLM(
        model=config_path,
        random_weights=True,
        device=str(device_under_test()),
        dtype="float32",
        block_size=BLOCK,
        kv_cache_gib=blocks * BYTES_PER_BLOCK / 2**30,
        async_scheduling=async_scheduling,
        **kw,
    )


def prompts():
    return [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate((5, 40, 17, 70, 1, 33))]


def params():
    return [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=1.2, top_k=20, seed=3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, min_tokens=4),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=0),
    ]


def summary(outs):
    return [(o.token_ids, o.logprobs, o.prompt_logprobs, o.finish_reason) for o in outs]


def test_async_equals_sync_with_chunked_prefill(config_path):
    sync = make(config_path, False, max_num_batched_tokens=24).generate(prompts(), params())
    llm = make(config_path, True, max_num_batched_tokens=24)
    assert llm.engine.async_scheduling
    assert summary(llm.generate(prompts(), params())) == summary(sync)
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks and not llm.engine.has_unfinished()


def test_async_stop_token_drops_the_extra_step(config_path):
    free = make(config_path, False).generate(prompts()[:2], params()[:2])
    stop_at = free[0].token_ids[4]
    stopped = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,)),
        params()[1],
    ]
    sync = make(config_path, False).generate(prompts()[:2], stopped)
    out = make(config_path, True).generate(prompts()[:2], stopped)
    assert summary(out) == summary(sync)
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == stop_at


def test_async_preemption_with_a_token_in_flight(config_path):
    # 10 blocks for 4 sequences that grow to 3 blocks each: some are preempted while their
    # newest token is still in flight, and recomputed later.
    ps = [[(3 * i + j) % 128 for j in range(20)] for i in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    big = make(config_path, False).generate(ps, sp)
    llm = make(config_path, True, blocks=10)
    out = llm.generate(ps, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in big]
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks


def test_async_abort_while_in_flight_frees_blocks(config_path):
    llm = make(config_path, True)
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    a = engine.add_request(prompts()[1], sp)
    b = engine.add_request(prompts()[3], sp)
    for _ in range(4):
        engine.step()
    engine.abort(a)
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id != a
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == [b] and len(finished[b].token_ids) == 50
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks
