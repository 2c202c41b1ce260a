"""`longctx serve` as a user runs it: a server process on loopback with the default model,
driven by the `openai` package and httpx. One server for the whole module (start-up loads the
model); prompts and max_tokens are small to keep the module within a few minutes on 2 cores."""

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from longctx import LLM, SamplingParams
from longctx.loading import default_model_path

pytestmark = pytest.mark.slow

KEY = "sk-longctx-test"
MAX_MODEL_LEN = 1024
MAX_BODY = 1 << 20
# The server schedules asynchronously (as it does on CUDA by default) while the offline
# reference runs synchronously: the outputs must still be identical.
SERVER_FLAGS = [
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--kv-cache-gib",
    "0.25",
    "--async-scheduling",
]
START_TIMEOUT_S = 600  # the default model loads in ~10 s alone, far slower on busy shared cores

PROMPTS = [
    "def add(a, b):",
    "The capital of France is",
    "# Sort a list in Python\nxs = [3, 1, 2]\n",
    "SELECT name FROM users WHERE",
]
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]
MAX_TOKENS = 8


@dataclass(frozen=True)
class Server:
    url: str
    model: str
    log: Path


@dataclass(frozen=True)
class Offline:
    completions: list  # RequestOutput per PROMPTS entry, greedy, logprobs=2
    chat: object


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(default_model_path(fetch=True))


@pytest.fixture(scope="module")
def server_process(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "longctx.entrypoints.cli", "serve", "--model", model_path]
            + ["--port", "0", "--api-key", KEY, "--max-request-bytes", str(MAX_BODY)]
            + SERVER_FLAGS,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def offline(model_path, server_process) -> Offline:
    """The same requests through the offline API, loaded while the server process loads."""
    llm = LLM(
        model=model_path, max_model_len=MAX_MODEL_LEN, kv_cache_gib=0.25, async_scheduling=False
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2)
    return Offline(completions=llm.generate(PROMPTS, params), chat=llm.chat(CHAT, params)[0])


@pytest.fixture(scope="module")
def server(server_process, offline, model_path) -> Server:
    proc, log = server_process
    return Server(_wait_until_serving(proc, log), model_path, log)


def _wait_until_serving(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        found = re.search(r"serving .* on (http://\S+)", log.read_text())
        if found:
            try:
                if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                    return found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def name(server) -> str:
    """The served model name: the GGUF file's stem."""
    return Path(server.model).stem


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
    ) as c:
        yield c


def metric_values(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for_idle(http: httpx.Client, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metric_values(http)
        idle = m["longctx_num_requests_running"] == 0 and m["longctx_kv_cache_blocks_used"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


ABORTS = 'longctx_requests_finished_total{finish_reason="abort"}'


# --- generation ---------------------------------------------------------------------------------


def test_models_lists_the_served_name(client, name):
    assert [m.id for m in client.models.list().data] == [name]


def test_concurrent_greedy_completions_match_offline(client, offline, name, server):
    def complete(prompt: str):
        return client.completions.create(
            model=server.model if prompt == PROMPTS[-1] else name,  # the path is an alias
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(complete, PROMPTS))
    for resp, want in zip(responses, offline.completions):
        assert resp.choices[0].text == want.text
        assert resp.choices[0].finish_reason == want.finish_reason
        assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
        assert resp.usage.completion_tokens == len(want.token_ids)


def test_streamed_completion_equals_the_whole_one(client, offline, name):
    chunks = list(
        client.completions.create(
            model=name,
            prompt=PROMPTS[0],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, usage = chunks
    assert "".join(c.choices[0].text for c in content) == offline.completions[0].text
    assert content[-1].choices[0].finish_reason == offline.completions[0].finish_reason
    assert usage.choices == [] and usage.usage.completion_tokens == MAX_TOKENS


def test_chat_whole_and_streamed_match_offline(client, offline, name):
    model = name
    whole = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert whole.choices[0].message.content == offline.chat.text
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline.chat.text
    assert chunks[-1].choices[0].finish_reason == offline.chat.finish_reason


def test_logprobs_match_offline(client, offline, name):
    want = offline.completions[1]
    want_lps = [d[t] for d, t in zip(want.logprobs, want.token_ids)]
    resp = client.completions.create(
        model=name,
        prompt=PROMPTS[1],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=2,
    )
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want_lps, abs=1e-3)
    assert "".join(lp.tokens) == want.text
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=name,
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    chat_want = [d[t] for d, t in zip(offline.chat.logprobs, offline.chat.token_ids)]
    assert [c.logprob for c in content] == pytest.approx(chat_want, abs=1e-3)
    assert all(len(c.top_logprobs) == 2 and c.bytes for c in content)
    assert bytes(b for c in content for b in c.bytes).decode() == offline.chat.text


def test_stop_string_cuts_the_text(client, offline, name):
    text = offline.completions[0].text
    stop = text.strip()[2:5]
    resp = client.completions.create(
        model=name,
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stop=[stop],
    )
    assert resp.choices[0].text == text[: text.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


# --- disconnects ------------------------------------------------------------------------------


def test_closing_a_stream_frees_its_kv_blocks(http):
    aborts = metric_values(http)[ABORTS]
    body = {"prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
    m = wait_for_idle(http)
    assert m["longctx_num_requests_running"] == 0
    assert m["longctx_kv_cache_blocks_used"] == 0
    assert m[ABORTS] == aborts + 1


def test_a_client_giving_up_on_a_whole_response_aborts_it(http):
    aborts = metric_values(http)[ABORTS]
    body = {"prompt": PROMPTS[1], "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=2)
    m = wait_for_idle(http)
    assert m["longctx_kv_cache_blocks_used"] == 0
    assert m[ABORTS] == aborts + 1


# --- refusals ---------------------------------------------------------------------------------


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_requests_get_openai_errors(http):
    assert error_of(http.post("/v1/completions", content=b"{oops"), 400)["code"] == "invalid_json"
    assert error_of(http.post("/v1/completions", json={"max_tokens": 3}), 400)["param"] == "prompt"
    assert error_of(http.post("/v1/chat/completions", json={"messages": "hi"}), 400)
    n2 = http.post("/v1/completions", json={"prompt": "hi", "n": 0})
    assert error_of(n2, 400)["param"] == "n"


def test_openai_client_sees_typed_errors(client, name):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt="hi", max_tokens=1, n=0)
    bad_key = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model=name, prompt="hi", max_tokens=1)


def test_api_key_is_required(server):
    body = {"prompt": "hi", "max_tokens": 1}
    assert error_of(httpx.post(server.url + "/v1/completions", json=body), 401)
    wrong = {"Authorization": "Bearer nope"}
    assert error_of(httpx.post(server.url + "/v1/completions", json=body, headers=wrong), 401)
    assert error_of(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/health").status_code == 200


def test_prompts_over_the_context_limit_are_refused(http):
    by_tokens = http.post("/v1/completions", json={"prompt": "word " * (MAX_MODEL_LEN + 50)})
    assert error_of(by_tokens, 400)["code"] == "context_length_exceeded"
    by_chars = http.post("/v1/completions", json={"prompt": "y" * (MAX_BODY // 2)})
    error = error_of(by_chars, 400)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    assert wait_for_idle(http)["longctx_kv_cache_blocks_used"] == 0


def test_bodies_over_the_limit_are_413(http):
    resp = http.post("/v1/completions", content=json.dumps({"prompt": "z" * (2 * MAX_BODY)}))
    assert error_of(resp, 413)["code"] == "request_too_large"


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_parse_and_count(http):
    parser = pytest.importorskip("prometheus_client.parser")
    http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3})
    text = http.get("/metrics").text
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    for family in (
        "longctx_num_requests_waiting",
        "longctx_num_requests_running",
        "longctx_kv_cache_blocks_used",
        "longctx_kv_cache_blocks_total",
        "longctx_prefill_tokens_remaining",
        "longctx_time_to_first_token_seconds",
        "longctx_inter_token_latency_seconds",
        "longctx_requests_finished",
    ):
        assert family in families, family
    ttft_count = next(
        s.value
        for s in families["longctx_time_to_first_token_seconds"].samples
        if s.name.endswith("_count")
    )
    assert ttft_count >= 1
    assert families["longctx_kv_cache_blocks_total"].samples[0].value > 0
