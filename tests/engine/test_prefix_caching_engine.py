"""Prefix caching through the whole engine on a tiny transformers Qwen2 (float32, CPU): a
follow-up on a cached document gives what an engine without the cache gives, with and without
DCA (+ YaRN), in chunked prefill, with sparse prefill at a full budget and an fp8 cache; memory
pressure evicts cached blocks and concurrent requests share them."""

from __future__ import annotations

import pytest
import torch

from longctx import LLM, DCAConfig, SamplingParams
from longctx.engine.kv_cache import kv_bytes_per_token
from longctx.sparse.config import SparseConfig
from tests.engine.test_dca_engine import random_prompts
from tests.hf_reference import checkpoint_of, tiny_hf_model

BS = 16
TOL = 1e-4  # float32 sums in another order (other chunk boundaries)
FP8_TOL = 2e-3
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)
# c = 48: a 150-token prompt spans four DCA chunks (intra, successive and inter parts), and
# the YaRN factor is > 1 past 32 tokens.
DCA = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=32)
FULL_SPARSE = SparseConfig(default_vertical=10**6, default_slash=10**6, threshold=40, last_q=8)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=11)


@pytest.fixture(scope="module")
def doc():
    doc, q1, q2 = random_prompts([150, 7, 9], seed=4)
    return doc, q1, q2


def make_llm(hf, **kw) -> LLM:
    kw.setdefault("block_size", BS)
    kw.setdefault("kv_cache_gib", 0.02)
    return LLM(checkpoint=checkpoint_of(hf), dtype="float32", device="cpu", **kw)


def assert_same(got, want, tol: float = TOL) -> None:
    assert got.token_ids == want.token_ids
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert a.keys() == b.keys()
        assert max(abs(a[t] - b[t]) for t in a) < tol


def tolerance(settings: dict) -> float:
    # An fp8 cache can round a later layer's key to the next e4m3 value when float32 sums of
    # the earlier layer come out in another order (other chunk boundaries).
    return FP8_TOL if settings.get("kv_cache_dtype") == "fp8" else TOL


SETTINGS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 32},
    "dca-yarn": {"dca": DCA},
    "dca-chunked": {"dca": DCA, "max_num_batched_tokens": 40},
    "sparse-full-budget": {"sparse": FULL_SPARSE, "max_num_batched_tokens": 48},
    "sparse-dca": {"sparse": FULL_SPARSE, "dca": DCA, "max_num_batched_tokens": 48},
    "fp8": {"kv_cache_dtype": "fp8"},
    "async": {"async_scheduling": True, "max_num_batched_tokens": 32},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_follow_up_on_a_cached_document_equals_the_uncached_run(hf, doc, settings):
    doc_ids, q1, q2 = doc
    cold = make_llm(hf, enable_prefix_caching=False, **settings)
    want = cold.generate([doc_ids + q1, doc_ids + q2], GREEDY)
    assert [o.num_cached_tokens for o in want] == [0, 0]
    warm = make_llm(hf, **settings)
    warm.generate(doc_ids, SamplingParams(max_tokens=1))
    got = [warm.generate(doc_ids + q, GREEDY)[0] for q in (q1, q2)]
    full_blocks = len(doc_ids) // BS * BS
    assert [o.num_cached_tokens for o in got] == [full_blocks, full_blocks]
    for g, w in zip(got, want, strict=True):
        assert_same(g, w, tolerance(settings))
    blocks = warm.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks
    assert all(blocks.pool.refs(b) == 0 for b in range(blocks.num_blocks))


def test_the_same_prompt_twice_recomputes_only_its_last_block(hf, doc):
    doc_ids = doc[0][:144]  # a whole number of blocks
    llm = make_llm(hf)
    first = llm.generate(doc_ids, GREEDY)[0]
    again = llm.generate(doc_ids, GREEDY)[0]
    assert again.num_cached_tokens == 128
    assert_same(again, first)


def test_prompt_logprobs_requests_bypass_the_cache_and_match(hf, doc):
    doc_ids, q1, _ = doc
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2)
    cold = make_llm(hf, enable_prefix_caching=False).generate(doc_ids + q1, params)[0]
    llm = make_llm(hf)
    llm.generate(doc_ids, SamplingParams(max_tokens=1))
    warm = llm.generate(doc_ids + q1, params)[0]
    assert warm.num_cached_tokens == 0 and warm.token_ids == cold.token_ids
    assert len(warm.prompt_logprobs) == len(cold.prompt_logprobs) == len(doc_ids + q1)
    for a, b in zip(warm.prompt_logprobs[1:], cold.prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < TOL


def test_memory_pressure_evicts_least_recently_used_documents(hf, doc):
    doc_ids, q1, _ = doc
    per_block = kv_bytes_per_token(checkpoint_of(hf).config, torch.float32) * BS
    llm = make_llm(hf, kv_cache_gib=14 * per_block / 2**30)  # 14 blocks: one document's worth
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_blocks == 14
    want = make_llm(hf, enable_prefix_caching=False).generate(doc_ids + q1, GREEDY)[0]
    llm.generate(doc_ids, SamplingParams(max_tokens=1))  # 9 full blocks cached
    other = random_prompts([150], seed=99)[0]
    llm.generate(other, SamplingParams(max_tokens=1))  # needs 10 blocks: evicts the doc's tail
    assert blocks.pool.num_cached <= 14
    got = llm.generate(doc_ids + q1, GREEDY)[0]
    assert 0 <= got.num_cached_tokens < 144  # its tail went first, so only a head is left
    assert_same(got, want)
    assert blocks.num_free == 14


def test_concurrent_requests_share_the_document_blocks(hf, doc):
    doc_ids, q1, q2 = doc
    cold = make_llm(hf, enable_prefix_caching=False)
    want = cold.generate([doc_ids + q1, doc_ids + q2], GREEDY)
    llm = make_llm(hf, max_num_batched_tokens=64)
    engine = llm.engine
    a = engine.add_request(doc_ids + q1, GREEDY)
    b = engine.add_request(doc_ids + q2, GREEDY)
    blocks = engine.scheduler.blocks
    outs, peak_refs = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        peak_refs = max(peak_refs, max(blocks.pool.refs(x) for x in range(blocks.num_blocks)))
    assert peak_refs == 2  # the document's blocks were held by both at once
    assert outs[a].num_cached_tokens == 0 and outs[b].num_cached_tokens == 144
    assert_same(outs[a], want[0])
    assert_same(outs[b], want[1])
    stats = blocks.stats()
    assert stats == engine.prefix_cache_stats()
    assert stats.hit_tokens == 144 and stats.hit_rate == pytest.approx(144 / (157 + 159))
    assert blocks.num_free == blocks.num_blocks


def test_aborting_a_sharing_request_releases_only_its_references(hf, doc):
    doc_ids, q1, q2 = doc
    llm = make_llm(hf)
    engine = llm.engine
    llm.generate(doc_ids, SamplingParams(max_tokens=1))
    a = engine.add_request(doc_ids + q1, GREEDY)
    b = engine.add_request(doc_ids + q2, GREEDY)
    engine.step()
    blocks = engine.scheduler.blocks
    shared = [s for s in engine.scheduler.running if s.request_id == a][0].block_table[:9]
    assert [blocks.pool.refs(x) for x in shared] == [2] * 9
    engine.abort(a)
    assert [blocks.pool.refs(x) for x in shared] == [1] * 9
    while engine.has_unfinished():
        engine.step()
    assert engine.abort(b) is None and blocks.num_free == blocks.num_blocks
    assert blocks.pool.num_cached >= 9


def test_no_prefix_caching_recomputes_everything(hf, doc):
    doc_ids, q1, _ = doc
    llm = make_llm(hf, enable_prefix_caching=False)
    llm.generate(doc_ids, SamplingParams(max_tokens=1))
    assert llm.generate(doc_ids + q1, GREEDY)[0].num_cached_tokens == 0
    assert llm.engine.scheduler.blocks.pool.num_cached == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failed_step_leaves_no_unwritten_block_cached(hf, doc, monkeypatch, async_scheduling):
    """Blocks are committed only for steps that were launched, and a launch that raises
    changes no sequence (llm_engine._launch_guarded): its requests are aborted uncommitted. An
    asynchronous step in flight when the next launch fails was queued whole, so its blocks
    (committed while it was in flight) do get written: the cache stays in both modes. (A
    failure while completing a step in flight forgets the whole cache: step() below.)"""
    doc_ids, q1, _ = doc
    llm = make_llm(hf, async_scheduling=async_scheduling, max_num_batched_tokens=32)
    want = make_llm(hf, enable_prefix_caching=False).generate(doc_ids + q1, GREEDY)[0]
    llm.generate(doc_ids, SamplingParams(max_tokens=1))
    blocks = llm.engine.scheduler.blocks
    assert blocks.pool.num_cached == 9
    real, calls = llm.engine.runner.launch, []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "launch", fail_third)
    other = random_prompts([120], seed=5)[0]
    with pytest.raises(RuntimeError, match="device failure"):
        llm.generate(other, GREEDY)  # 4 prefill steps of 32 tokens: fails in the third
    monkeypatch.undo()
    assert blocks.num_free == blocks.num_blocks
    # the document's 9 blocks and the 4 that the two steps before the failure computed
    assert blocks.pool.num_cached == 13
    got = llm.generate(doc_ids + q1, GREEDY)[0]
    assert got.num_cached_tokens == 144
    assert_same(got, want)
