"""More concurrent requests than the KV cache holds at once: they wait, some are preempted and
recomputed, and each still gets the greedy text it gets alone; /metrics shows the waiting and
the preemptions, and every block is back at the end."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from longctx import LLM, SamplingParams
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.hf_reference import checkpoint_of, tiny_hf_model
from tests.server.live import live_server, metric_values, wait_for_idle

BLOCK = 16
NUM_BLOCKS = 13  # 208 tokens: two of the requests below at once, three only briefly
PROMPTS = [[(11 * i + 3 * j) % 300 + 1 for j in range(60)] for i in range(8)]
MAX_TOKENS = 30


@pytest.fixture(scope="module")
def llm():
    # 2 layers x 2 KV heads x head_dim 16 x (k, v) x 4 bytes = 512 bytes a token.
    kv_gib = NUM_BLOCKS * BLOCK * 512 / 2**30
    return LLM(
        checkpoint=checkpoint_of(tiny_hf_model(seed=5)), device="cpu", dtype="float32",
        kv_cache_gib=kv_gib * 1.001, block_size=BLOCK, max_model_len=256,
    )  # fmt: skip


@pytest.fixture(scope="module")
def alone(llm) -> list[str]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [llm.generate([p], params)[0].text for p in PROMPTS]


def test_load_beyond_the_kv_cache_matches_one_at_a_time(llm, alone):
    assert llm.engine.scheduler.blocks.num_blocks == NUM_BLOCKS
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with live_server(create_app(EngineLoop(llm.engine), ServerConfig("tiny"))) as url:

        def complete(prompt):
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, **body}, timeout=120)
            return r.json()["choices"][0]["text"]

        most_waiting = 0
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = pool.map(complete, PROMPTS)
            for _ in range(50):
                most_waiting = max(most_waiting, metric_values(url)["longctx_num_requests_waiting"])
                time.sleep(0.01)
            texts = list(texts)
        m = wait_for_idle(url)
    assert texts == alone
    assert most_waiting >= 1
    assert m["longctx_num_preemptions_total"] >= 1
    assert m["longctx_kv_cache_blocks_used"] == 0
    assert m['longctx_requests_finished_total{finish_reason="length"}'] == len(PROMPTS)
