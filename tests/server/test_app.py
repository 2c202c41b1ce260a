"""The HTTP layer in process (starlette's TestClient) over a tiny random model without a
tokenizer: request validation, error bodies, auth, body limits and the response shapes."""

import json

import pytest
from fastapi.testclient import TestClient

from longctx import LLM, SamplingParams
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.hf_reference import checkpoint_of, tiny_hf_model

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4096
IDS = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def llm():
    return LLM(
        checkpoint=checkpoint_of(tiny_hf_model(seed=4)),
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.01,
        block_size=16,
        max_model_len=128,
    )


@pytest.fixture(scope="module")
def offline(llm):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
    return llm.generate([IDS], params)[0]


@pytest.fixture(scope="module")
def client(llm, offline):
    config = ServerConfig("tiny", ("tiny-path",), api_key=KEY, max_request_bytes=LIMIT)
    with TestClient(create_app(EngineLoop(llm.engine), config)) as c:
        yield c


def post(client, path, body, headers=AUTH):
    return client.post(path, content=json.dumps(body), headers=headers)


def assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def sse_payloads(text):
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


GREEDY = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}


def test_token_id_completion_matches_offline(client, offline):
    resp = post(
        client, "/v1/completions", {"model": "tiny", "prompt": IDS, "logprobs": 2, **GREEDY}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in offline.token_ids]
    want = [d[t] for d, t in zip(offline.logprobs, offline.token_ids)]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 2 for top in lp["top_logprobs"])


def test_streamed_completion_has_openai_chunks(client, offline):
    body = {"prompt": IDS, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    body["logprobs"] = 0
    resp = post(client, "/v1/completions", body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(resp.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    *content, usage = chunks
    tokens = [t for c in content for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == [f"token_id:{t}" for t in offline.token_ids]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_several_prompts_become_several_choices(client, offline):
    resp = post(client, "/v1/completions", {"prompt": [IDS, [1, 2]], "logprobs": 0, **GREEDY})
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in offline.token_ids]
    assert resp.json()["usage"]["prompt_tokens"] == 7


def test_models_and_health(client):
    models = client.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 128
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_is_required_on_v1(client, headers):
    assert_error(post(client, "/v1/completions", {"prompt": IDS}, headers), 401)
    assert_error(client.get("/v1/models", headers=headers), 401)


def test_health_and_metrics_need_no_key(client):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "prompt"),
        ({"prompt": IDS, "max_tokens": 0}, "max_tokens"),
        ({"prompt": IDS, "temperature": -1}, "temperature"),
        ({"prompt": IDS, "top_p": 0}, "top_p"),
        ({"prompt": IDS, "n": 0}, "n"),
        ({"prompt": IDS, "logprobs": 21}, "logprobs"),
        ({"prompt": IDS, "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": IDS, "logit_bias": {"7": 101}}, "logit_bias"),
        ({"prompt": IDS, "logit_bias": {"1000": 1}}, None),  # outside the vocabulary
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": {"a": 1}}, None),
        ({"prompt": [1, 10_000]}, "prompt"),  # outside the vocabulary
        ({"prompt": "text needs a tokenizer"}, None),
        ({"prompt": IDS, "stop": [""]}, None),
    ],
)
def test_invalid_completion_requests(client, body, param):
    assert_error(post(client, "/v1/completions", body), 400, param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_invalid_chat_requests(client, body, param):
    assert_error(post(client, "/v1/chat/completions", body), 400, param)


def test_prompt_over_the_context_limit(client):
    error = assert_error(post(client, "/v1/completions", {"prompt": [1] * 200}), 400)
    assert error["code"] == "context_length_exceeded" and "128" in error["message"]


def test_unknown_model_is_404(client):
    error = assert_error(post(client, "/v1/completions", {"model": "gpt-4", "prompt": IDS}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    alias = post(client, "/v1/completions", {"model": "tiny-path", "prompt": IDS, **GREEDY})
    assert alias.status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(client, body):
    assert_error(client.post("/v1/completions", content=body, headers=AUTH), 400)


def test_body_over_the_limit_is_413(client):
    big = json.dumps({"prompt": IDS, "user": "x" * LIMIT})
    assert_error(client.post("/v1/completions", content=big, headers=AUTH), 413)

    def chunked():  # no Content-Length: the limit holds while reading
        yield big[: LIMIT // 2].encode()
        yield big[LIMIT // 2 :].encode()

    assert_error(client.post("/v1/completions", content=chunked(), headers=AUTH), 413)


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing", headers=AUTH), 404)
    assert_error(client.get("/v1/completions", headers=AUTH), 405)


def test_a_local_only_server_refuses_other_hosts_and_web_pages():
    llm = LLM(checkpoint=checkpoint_of(tiny_hf_model(seed=4)), device="cpu", kv_cache_gib=0.01)
    config = ServerConfig("tiny", local_only=True)
    app = create_app(EngineLoop(llm.engine), config)
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/v1/models").status_code == 200
        assert local.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
        assert local.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
        rebound = local.get("/v1/models", headers={"Host": "evil.example:8000"})
        assert assert_error(rebound, 403)["code"] == "forbidden_origin"
        cross_site = post(
            local, "/v1/completions", {"prompt": IDS}, {"Origin": "https://x.example"}
        )
        assert_error(cross_site, 403)
        same_site = post(
            local, "/v1/completions", {"prompt": IDS, **GREEDY}, {"Origin": "http://localhost:3000"}
        )
        assert same_site.status_code == 200


def test_a_failing_engine_step_is_a_500_and_the_server_goes_on(client, llm, monkeypatch):
    def broken_step():
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(llm.engine, "step", broken_step)
    error = assert_error(post(client, "/v1/completions", {"prompt": IDS, **GREEDY}), 500)
    assert error["type"] == "server_error" and "simulated" not in error["message"]
    streamed = post(client, "/v1/completions", {"prompt": IDS, "stream": True, **GREEDY})
    assert streamed.status_code == 200
    assert "error" in sse_payloads(streamed.text)[-1]
    monkeypatch.undo()
    assert post(client, "/v1/completions", {"prompt": IDS, **GREEDY}).status_code == 200
    assert client.get("/health").status_code == 200


def test_null_fields_mean_their_defaults(client):
    body = {"prompt": IDS, "max_tokens": None, "n": None, "presence_penalty": None, "stop": None}
    resp = post(client, "/v1/completions", {**body, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] <= 16
