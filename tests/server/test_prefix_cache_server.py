"""Two clients asking about one document at once, through the engine thread and the HTTP app:
they share its KV blocks, get what an uncached engine gives, and /metrics counts the hits."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from longctx import LLM, SamplingParams
from longctx.engine.prefix_cache import PrefixCacheStats
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop, EngineRequest
from longctx.server.metrics import EngineStats, ServerMetrics
from tests.engine.test_dca_engine import random_prompts
from tests.hf_reference import checkpoint_of, tiny_hf_model

parser = pytest.importorskip("prometheus_client.parser")

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
DOC, Q1, Q2 = random_prompts([120, 5, 6], seed=8)


def make_llm(**kw) -> LLM:
    return LLM(
        checkpoint=checkpoint_of(tiny_hf_model(seed=3)),
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.01,
        block_size=16,
        max_model_len=256,
        max_num_batched_tokens=48,  # the document takes three steps
        **kw,
    )


def metric(text: str, name: str) -> float:
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def test_two_clients_on_one_document_share_its_blocks():
    want = make_llm(enable_prefix_caching=False).generate([DOC + Q1, DOC + Q2], GREEDY)
    llm = make_llm()
    loop = EngineLoop(llm.engine)
    loop.start()

    async def ask(rid, ids):
        req = EngineRequest(request_id=rid, prompt=None, prompt_token_ids=ids, params=GREEDY)
        async with loop.open([req]) as stream:
            return (await stream.final_outputs())[rid]

    async def main():
        return await asyncio.gather(ask("a", DOC + Q1), ask("b", DOC + Q2))

    try:
        outs = asyncio.run(main())
        config = ServerConfig("tiny", ("tiny-path",))
        with TestClient(create_app(loop, config)) as client:
            text = client.get("/metrics").text
    finally:
        loop.shutdown()
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert sorted(o.num_cached_tokens for o in outs) == [0, 112]  # 7 full blocks of 120
    assert metric(text, "longctx_prefix_cache_hit_tokens_total") == 112
    assert metric(text, "longctx_prefix_cache_queried_tokens_total") == 125 + 126
    assert metric(text, "longctx_prefix_cache_hit_rate") == pytest.approx(112 / 251, rel=1e-5)
    assert metric(text, "longctx_kv_cache_blocks_cached") >= 7
    assert metric(text, "longctx_kv_cache_blocks_used") == 0


def test_prefix_cache_series_render_at_zero():
    text = ServerMetrics().render(EngineStats(prefix_cache=PrefixCacheStats()))
    assert metric(text, "longctx_prefix_cache_hit_rate") == 0
    assert metric(text, "longctx_prefix_cache_hit_tokens_total") == 0
