"""n > 1 sampling: the n sequences of a prompt share one prefill (engine/forks.py). Greedy
children equal a single request (the shared blocks and the copied partial block hold the right
KV), seeded choice i equals a lone request with seed + i, the prompt is computed once and its
blocks are held once."""

import pytest

from longctx import LLM, SamplingParams
from tests.hf_reference import checkpoint_of, tiny_hf_model

BLOCK = 16


@pytest.fixture(scope="module")
def checkpoint():
    return checkpoint_of(tiny_hf_model(seed=5))


def make(checkpoint, async_scheduling=False, caching=True, **kw):
    return LLM(
        checkpoint=checkpoint,
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.01,
        block_size=BLOCK,
        max_model_len=512,
        async_scheduling=async_scheduling,
        enable_prefix_caching=caching,
        **kw,
    )


def prompt(n):
    return [(11 * i + 3) % 320 for i in range(n)]


class Counter:
    """Tokens the engine computes and the most KV blocks in use, step by step."""

    def __init__(self, llm):
        self.tokens = 0
        self.peak_blocks = 0
        engine, launch = llm.engine, llm.engine.runner.launch

        def counting(batch, prev=None):
            self.tokens += batch.num_tokens
            blocks = engine.scheduler.blocks
            self.peak_blocks = max(self.peak_blocks, blocks.num_blocks - blocks.num_free)
            return launch(batch, prev)

        engine.runner.launch = counting


@pytest.mark.parametrize("length", [33, 40, 48])  # P - 1 on a block boundary, and not
@pytest.mark.parametrize("async_scheduling,caching", [(False, False), (True, True)])
def test_greedy_children_equal_a_single_request(checkpoint, length, async_scheduling, caching):
    llm = make(checkpoint, async_scheduling, caching)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    single = llm.generate([prompt(length)], greedy)[0].token_ids
    outs = llm.generate([prompt(length)], SamplingParams(**{**greedy.__dict__, "n": 3}))
    assert [o.token_ids for o in outs] == [single] * 3


def test_seeded_choices_equal_lone_requests_with_seed_plus_i(checkpoint):
    llm = make(checkpoint, caching=False)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=40, n=3)
    outs = llm.generate([prompt(37), prompt(5)], params)
    assert len(outs) == 6
    for j, p in enumerate((prompt(37), prompt(5))):
        for i in range(3):
            alone = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=40 + i)
            assert outs[3 * j + i].token_ids == llm.generate([p], alone)[0].token_ids
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_prompt_is_computed_once_and_held_once(checkpoint, async_scheduling):
    llm = make(checkpoint, async_scheduling, caching=False)
    n, length, new = 8, 200, 6
    count = Counter(llm)
    params = SamplingParams(temperature=0.8, max_tokens=new, ignore_eos=True, n=n, seed=1)
    llm.generate([prompt(length)], params)
    # The leader's prompt, then per sequence its decode steps; each child recomputes only the
    # last prompt token (in place of the leader's first decode input).
    assert count.tokens == length + (n - 1) * 1 + n * (new - 1)
    prompt_blocks = -(-length // BLOCK)
    tail_blocks = -(-(length % BLOCK + new) // BLOCK)  # each child's copy of the last block on
    assert count.peak_blocks <= prompt_blocks + n * tail_blocks
    assert count.peak_blocks < 2 * prompt_blocks


def test_prompt_logprobs_are_shared(checkpoint):
    llm = make(checkpoint)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    single = llm.generate([prompt(30)], params)[0]
    outs = llm.generate([prompt(30)], SamplingParams(**{**params.__dict__, "n": 2}))
    assert [o.prompt_logprobs for o in outs] == [single.prompt_logprobs] * 2


def test_aborts_of_children_and_of_the_leader(checkpoint):
    llm = make(checkpoint, caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    lead = engine.add_request(prompt(50), params)
    kids = [engine.add_request(prompt(50), params, share_prompt_with=lead) for _ in range(2)]
    engine.abort(kids[0])
    engine.abort(lead)  # before the fork: the other child runs as an ordinary request
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(done) == {kids[1]}
    single = llm.generate([prompt(50)], params)[0]
    assert done[kids[1]].token_ids == single.token_ids
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks


def test_sharing_needs_the_same_prompt(checkpoint):
    engine = make(checkpoint).engine
    lead = engine.add_request(prompt(10), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="share_prompt_with"):
        engine.add_request(prompt(11), SamplingParams(max_tokens=2), share_prompt_with=lead)
