"""The OpenAI sampling fields through both endpoints equal the offline API's SamplingParams:
penalties, logit_bias, seed; echo with prompt logprobs (in process, tiny random model without a
tokenizer)."""

import json

import pytest
from fastapi.testclient import TestClient

from longctx import SamplingParams
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.server import test_app

llm = test_app.llm  # the fixture: the same tiny model
IDS = [5, 6, 7, 8, 9, 5, 6]


FIELDS = [
    {"temperature": 0, "frequency_penalty": 1.5, "presence_penalty": -0.5},
    {"temperature": 0, "repetition_penalty": 1.7},
    {"temperature": 0.9, "seed": 77, "presence_penalty": 0.8, "logit_bias": {"11": 3.5}},
]


def offline_params(fields):
    bias = {int(k): v for k, v in fields.get("logit_bias", {}).items()}
    return SamplingParams(
        max_tokens=12, ignore_eos=True, logprobs=0, **{**fields, "logit_bias": bias or None}
    )


@pytest.fixture(scope="module")
def offline(llm):
    # Before the server's engine thread starts: the engine is not shared between threads.
    return llm.generate([IDS] * len(FIELDS), [offline_params(f) for f in FIELDS])


@pytest.fixture(scope="module")
def llm_prompt_logprobs(llm):
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    return llm.generate([IDS], params)[0]


@pytest.fixture(scope="module")
def offline_n(llm):
    params = SamplingParams(max_tokens=6, ignore_eos=True, seed=9, n=3)
    return llm.generate([IDS, IDS[:3]], params)


@pytest.fixture(scope="module")
def client(llm, offline, llm_prompt_logprobs, offline_n):
    with TestClient(create_app(EngineLoop(llm.engine), ServerConfig("tiny"))) as c:
        yield c


def completion(client, **body):
    resp = client.post("/v1/completions", content=json.dumps({"prompt": IDS, **body}))
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


@pytest.mark.parametrize("case", range(len(FIELDS)))
def test_completion_fields_reach_the_sampler(client, offline, case):
    choice = completion(client, max_tokens=12, ignore_eos=True, logprobs=0, **FIELDS[case])
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert tokens == offline[case].token_ids


def test_logit_bias_of_100_forces_the_token(client):
    choice = completion(client, max_tokens=4, temperature=1.0, logit_bias={"42": 100}, logprobs=0)
    assert choice["logprobs"]["tokens"] == ["token_id:42"] * 4


@pytest.mark.parametrize(
    ("field", "value"),
    # 5e-324 was a 500 found by the fuzzer: its reciprocal overflowed the logits to inf.
    [("frequency_penalty", -2.5), ("repetition_penalty", 5e-324), ("repetition_penalty", 1e300)],
)
def test_chat_refuses_out_of_range_penalties(client, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    resp = client.post("/v1/chat/completions", content=json.dumps(body))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field


def test_echo_with_logprobs_scores_the_prompt(client, llm_prompt_logprobs):
    choice = completion(client, max_tokens=2, temperature=0, logprobs=2, echo=True)
    lps = choice["logprobs"]
    n = len(IDS)
    assert lps["tokens"][:n] == [f"token_id:{t}" for t in IDS]
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    expected = llm_prompt_logprobs.prompt_logprobs
    for i in range(1, n):
        assert lps["token_logprobs"][i] == pytest.approx(expected[i][IDS[i]], abs=1e-5)
        assert len(lps["top_logprobs"][i]) >= 2
    assert len(lps["tokens"]) == n + 2
    assert lps["text_offset"] == sorted(lps["text_offset"]) and lps["text_offset"][0] == 0
    assert choice["text"].startswith("".join(f"token_id:{t}" for t in IDS))


def test_streamed_echo_comes_first(client):
    body = {"prompt": IDS, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 0}
    resp = client.post("/v1/completions", content=json.dumps({**body, "stream": True}))
    events = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e[6:] not in ("", "[DONE]")]
    texts = "".join(e["choices"][0]["text"] for e in events)
    whole = completion(client, **body)
    assert texts == whole["text"]
    tokens = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == whole["logprobs"]["tokens"]


def test_echo_without_logprobs_is_text_only(client):
    choice = completion(client, max_tokens=1, temperature=0, echo=True)
    assert choice["text"].startswith("token_id:5") and choice["logprobs"] is None


@pytest.mark.parametrize(
    "path,fields,param",
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"min_p": 0.1}, "min_p"),
        ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json"),
        ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
        ("/v1/completions", {"suffix": "x"}, "suffix"),
    ],
)
def test_parameters_with_a_meaning_we_do_not_give_are_refused(client, path, fields, param):
    body = {"prompt": IDS} if path == "/v1/completions" else {"messages": [CHAT]}
    resp = client.post(path, content=json.dumps({**body, **fields}))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_neutral_values_of_refused_parameters_pass(client):
    fields = {"store": False, "modalities": ["text"], "min_p": 0.0, "user": "u", "metadata": {}}
    body = {"prompt": IDS, "max_tokens": 1, **fields}
    assert client.post("/v1/completions", content=json.dumps(body)).status_code == 200


CHAT = {"role": "user", "content": "hi"}


def test_n_choices_share_a_prompt_and_follow_their_seeds(client, offline_n):
    body = {"prompt": [IDS, IDS[:3]], "n": 3, "max_tokens": 6, "ignore_eos": True}
    resp = client.post("/v1/completions", content=json.dumps({**body, "seed": 9, "logprobs": 0}))
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    tokens = [[int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]] for c in choices]
    assert tokens == [o.token_ids for o in offline_n]


def test_streamed_n_choices_each_finish(client):
    body = {"prompt": IDS, "n": 2, "max_tokens": 2, "stream": True, "ignore_eos": True}
    resp = client.post("/v1/completions", content=json.dumps(body))
    events = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e[6:] not in ("", "[DONE]")]
    finished = {e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]}
    assert finished == {0, 1}
