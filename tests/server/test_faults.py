"""A fault in one step (out of memory in a prefill chunk, injected) fails the request whose
chunk it was, with a 5xx body or an error event; its blocks are freed and the requests that
shared the step go on to the same text they get alone. Synchronous and asynchronous engines."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from longctx import LLM
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.hf_reference import checkpoint_of, tiny_hf_model
from tests.server.live import live_server, metric_values, wait_for_idle

ERRORS = 'longctx_requests_finished_total{finish_reason="error"}'
DECODER = {"prompt": [5, 6, 7, 8], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
VICTIM = {"prompt": list(range(1, 41)), "max_tokens": 4, "temperature": 0}  # a 40-token chunk


class OutOfMemoryInPrefill:
    """Wraps the model: while armed, a forward pass over 40 or more tokens runs out of memory,
    and shorter ones are slowed so that a decoder is still running when the victims come,
    however fast the machine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.armed = model, False
        self.fired: list[int] = []  # how many requests each failed step had
        self.forward = model.forward
        model.forward = self

    def __call__(self, input_ids, ctx):
        if self.armed and input_ids.shape[0] >= 40:
            self.fired.append(len(ctx.meta.layout.query_lens))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.armed:
            time.sleep(0.02)
        return self.forward(input_ids, ctx)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def setup(request):
    llm = LLM(
        checkpoint=checkpoint_of(tiny_hf_model(seed=3)), device="cpu", dtype="float32",
        kv_cache_gib=0.01, block_size=16, max_model_len=256, async_scheduling=request.param,
    )  # fmt: skip
    fault = OutOfMemoryInPrefill(llm.engine.runner.model)
    with live_server(create_app(EngineLoop(llm.engine), ServerConfig("tiny"))) as url:
        yield url, fault


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def streamed_events(url: str, body: dict) -> list:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln[len("data: ") :] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def wait_until_running(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric_values(url)["longctx_num_requests_running"] == 0:
        assert time.monotonic() < deadline, "the decoder never started"
        time.sleep(0.01)


def test_an_oom_in_a_prefill_chunk_fails_that_request_alone(setup):
    url, fault = setup
    alone = post(url, DECODER).json()["choices"][0]["text"]
    errors = metric_values(url)[ERRORS]
    fault.armed = True
    try:
        with ThreadPoolExecutor(1) as pool:
            decoding = pool.submit(post, url, DECODER)
            wait_until_running(url)  # the decoder runs when the victim's chunk joins its step
            whole = post(url, VICTIM)
            events = streamed_events(url, VICTIM)
            survivor = decoding.result()
    finally:
        fault.armed = False
    assert fault.fired == [2, 2]  # each time in a step shared with the decoder
    assert whole.status_code == 500
    error = whole.json()["error"]
    assert error["type"] == "server_error" and "out of device memory" in error["message"]
    assert "error" in events[-1] and "out of device memory" in events[-1]["error"]["message"]
    assert survivor.status_code == 200
    assert survivor.json()["choices"][0]["text"] == alone
    m = wait_for_idle(url)
    assert m["longctx_kv_cache_blocks_used"] == 0 and m[ERRORS] == errors + 2
    assert post(url, VICTIM).status_code == 200  # and the server goes on
    assert httpx.get(url + "/health").json() == {"status": "ok"}
