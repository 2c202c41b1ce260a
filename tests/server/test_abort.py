"""A client that leaves during a long prefill chunk frees the engine within about a second.

The model is a tiny random one made deep (16 layers) so that one 4096-token prefill chunk takes
seconds on a CPU while one layer takes a fraction of one: without the between-layer abort check
a short request sent after the client left would wait for the rest of the chunk."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from longctx import LLM
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.hf_reference import checkpoint_of, tiny_hf_model
from tests.server.live import ABORTS, live_server, metric_values, wait_for_idle
from tests.server.tiny_chat_model import write_tiny_chat_model

CHUNK = 4096
LONG = [(7 * i) % 300 + 1 for i in range(CHUNK)]  # one whole prefill chunk
SHORT = {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def llm():
    hf = tiny_hf_model(seed=1, num_hidden_layers=16, hidden_size=128, intermediate_size=256)
    return LLM(
        checkpoint=checkpoint_of(hf), device="cpu", dtype="float32", kv_cache_gib=0.05,
        max_model_len=CHUNK + 64, max_num_batched_tokens=CHUNK,
        enable_prefix_caching=False,  # the same long prompt is prefilled again and again
    )  # fmt: skip


@pytest.fixture(scope="module")
def url(llm):
    with live_server(create_app(EngineLoop(llm.engine), ServerConfig("deep"))) as base:
        yield base


@pytest.fixture(scope="module")
def chunk_seconds(url) -> float:
    """How long the long prompt's one chunk takes here (after a warm-up run)."""
    body = {"prompt": LONG, "max_tokens": 1, "temperature": 0}
    httpx.post(url + "/v1/completions", json=body, timeout=300).raise_for_status()
    start = time.monotonic()
    httpx.post(url + "/v1/completions", json=body, timeout=300).raise_for_status()
    return time.monotonic() - start


def abandon(url: str, body: dict, after: float, stream: bool) -> float:
    """Send body, leave after `after` seconds; returns when the connection was closed."""
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            time.sleep(after)
        return time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=after)
    return time.monotonic()


def bound(chunk_seconds: float) -> float:
    # A layer is 1/16 of the chunk; leave room for a busy machine but stay far below the
    # ~0.7 chunk a short request would wait if the chunk ran to its end.
    return max(1.0, 0.3 * chunk_seconds)


def short_request_seconds(url: str) -> float:
    start = time.monotonic()
    httpx.post(url + "/v1/completions", json=SHORT, timeout=300).raise_for_status()
    return time.monotonic() - start


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_prompt_abandoned_mid_prefill_frees_the_engine(url, chunk_seconds, stream):
    aborts = metric_values(url)[ABORTS]
    body = {"prompt": LONG, "max_tokens": 1, "temperature": 0}
    after = 0.3 * chunk_seconds
    with ThreadPoolExecutor(1) as pool:
        left = pool.submit(abandon, url, body, after, stream)
        time.sleep(after / 2)
        during = metric_values(url)  # in the middle of the chunk
        left_at = left.result()
    waited = time.monotonic() - left_at + short_request_seconds(url)
    print(f"chunk {chunk_seconds:.2f} s, engine free {waited:.2f} s after the client left")
    assert waited < bound(chunk_seconds), (waited, chunk_seconds)
    # The gauges showed the request while its first chunk ran, not only after it.
    assert during["longctx_num_requests_running"] == 1
    assert during["longctx_prefill_tokens_remaining"] == CHUNK
    m = wait_for_idle(url)
    assert m["longctx_kv_cache_blocks_used"] == 0 and m[ABORTS] == aborts + 1


def test_queued_and_running_prompts_abandoned_together(url, chunk_seconds):
    aborts = metric_values(url)[ABORTS]
    body = {"prompt": LONG, "max_tokens": 1, "temperature": 0}
    after = 0.3 * chunk_seconds
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(abandon, url, body, after, True)
        time.sleep(0.05)
        queued = pool.submit(abandon, url, body, after, False)  # waits: the budget is full
        time.sleep(after / 2)
        during = metric_values(url)
        left_at = max(running.result(), queued.result())
    waited = time.monotonic() - left_at + short_request_seconds(url)
    assert waited < bound(chunk_seconds), (waited, chunk_seconds)
    assert during["longctx_num_requests_running"] == 1
    assert during["longctx_num_requests_waiting"] == 1
    assert during["longctx_prefill_tokens_remaining"] == 2 * CHUNK
    m = wait_for_idle(url)
    assert m["longctx_kv_cache_blocks_used"] == 0 and m[ABORTS] == aborts + 2


def test_an_abort_keeps_the_other_requests_of_the_step(llm, url):
    """Unwinding a step drops its work for every request in it: they must redo it, not lose
    it (the survivor's text equals the one it gets alone)."""
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
    with ThreadPoolExecutor(2) as pool:
        survivor = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=300)
        time.sleep(0.05)
        long = {"prompt": LONG, "max_tokens": 1}
        pool.submit(abandon, url, long, 0.5, True).result()
        together = survivor.result().json()
    assert together["choices"][0]["text"] == alone["choices"][0]["text"]
    assert wait_for_idle(url)["longctx_kv_cache_blocks_used"] == 0


def test_a_client_gone_while_its_prompt_is_tokenized_never_reaches_the_engine(tmp_path):
    llm = LLM(model=str(write_tiny_chat_model(tmp_path)), device="cpu", kv_cache_gib=0.01)
    loop = EngineLoop(llm.engine)
    opened, tokenizing = [], threading.Event()
    app = create_app(loop, ServerConfig("tiny"))
    encode = llm.tokenizer.encode

    def slow_encode(text, *args, **kw):  # the worker thread tokenizing a huge prompt
        tokenizing.set()
        time.sleep(2.0)
        return encode(text, *args, **kw)

    llm.tokenizer.encode = slow_encode
    real_open = loop.open
    loop.open = lambda requests: opened.append(requests) or real_open(requests)
    with live_server(app) as base:
        with ThreadPoolExecutor(1) as pool:
            left = pool.submit(abandon, base, {"prompt": "hello", "max_tokens": 5}, 0.5, False)
            assert tokenizing.wait(10)
            waiting = metric_values(base)["longctx_num_requests_waiting"]
            left.result()
        time.sleep(2.5)  # tokenizing ends after the client left
        assert opened == [] and waiting == 1
        assert wait_for_idle(base)["longctx_kv_cache_blocks_used"] == 0
