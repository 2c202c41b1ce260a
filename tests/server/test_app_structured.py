"""response_format over HTTP (in process): a tiny random model with the default model's real
tokenizer writes schema-valid JSON only because of the mask; unsupported schemas are 400s
naming the feature; a model without a tokenizer refuses structured output."""

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from longctx import LLM
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop
from tests.hf_reference import random_checkpoint_with_real_tokenizer
from tests.server import test_app
from tests.test_structured_output import SCHEMA

notokenizer_client = test_app.client
llm = test_app.llm
offline = test_app.offline


@pytest.fixture(scope="module")
def client():
    engine = LLM(
        checkpoint=random_checkpoint_with_real_tokenizer(),
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.02,
        block_size=16,
        max_model_len=512,
    ).engine
    with TestClient(create_app(EngineLoop(engine), ServerConfig("tiny"))) as c:
        yield c


def chat(client, **body):
    body = {"messages": [{"role": "user", "content": "JSON please"}], **body}
    return client.post("/v1/chat/completions", content=json.dumps(body))


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True},
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, stream):
    resp = chat(client, response_format=SCHEMA_FORMAT, max_tokens=200, seed=1, stream=stream)
    assert resp.status_code == 200, resp.text
    if stream:
        chunks = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e[6:] not in ("", "[DONE]")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = resp.json()["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_completions_take_response_format_too(client):
    body = {"prompt": "x", "response_format": SCHEMA_FORMAT, "max_tokens": 200, "seed": 2}
    resp = client.post("/v1/completions", content=json.dumps(body))
    assert resp.status_code == 200, resp.text
    jsonschema.validate(json.loads(resp.json()["choices"][0]["text"]), SCHEMA)


@pytest.mark.parametrize(
    "response_format,named",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, "not"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "array", "contains": {}}}},
            "contains",
        ),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "xml"}, None),
    ],
)
def test_unsupported_formats_are_400s_naming_them(client, response_format, named):
    resp = chat(client, response_format=response_format)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"].startswith("response_format")
    if named:
        assert named in error["message"]


def test_text_format_is_plain_generation(client):
    assert chat(client, response_format={"type": "text"}, max_tokens=3).status_code == 200


def test_a_model_without_tokenizer_refuses_structured_output(notokenizer_client):
    body = {"prompt": [1, 2], "response_format": {"type": "json_object"}}
    resp = notokenizer_client.post(
        "/v1/completions", content=json.dumps(body), headers=test_app.AUTH
    )
    assert resp.status_code == 400 and "tokenizer" in resp.json()["error"]["message"]


UNIT_TOOL = {
    "type": "function",
    "function": {
        "name": "set_unit",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_makes_even_a_random_model_call_it(client, stream):
    named = {"type": "function", "function": {"name": "set_unit"}}
    resp = chat(client, tools=[UNIT_TOOL], tool_choice=named, max_tokens=300, seed=5, stream=stream)
    assert resp.status_code == 200, resp.text
    if stream:
        chunks = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e[6:] not in ("", "[DONE]")]
        calls = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", [])]
        reason = chunks[-1]["choices"][0]["finish_reason"]
        assert [c["index"] for c in calls] == list(range(len(calls)))
    else:
        choice = resp.json()["choices"][0]
        calls, reason = choice["message"]["tool_calls"], choice["finish_reason"]
        assert choice["message"]["content"] is None
    assert reason == "tool_calls" and len(calls) == 1  # parallel calls are on, one came
    assert calls[0]["function"]["name"] == "set_unit" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"])["unit"] in ("celsius", "fahrenheit")


def test_auto_tool_choice_with_random_text_is_plain_content(client):
    resp = chat(client, tools=[UNIT_TOOL], max_tokens=8, seed=1)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]


def test_tool_results_and_earlier_calls_are_accepted(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "set_unit", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Use celsius."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]
    body = {"messages": messages, "tools": [UNIT_TOOL], "max_tokens": 2}
    assert client.post("/v1/chat/completions", content=json.dumps(body)).status_code == 200


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [UNIT_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            None,
        ),
        ({"tools": [UNIT_TOOL, UNIT_TOOL]}, None),
        ({"tools": [{"type": "code_interpreter"}]}, None),
        (
            {"tools": [UNIT_TOOL], "tool_choice": "required", "response_format": SCHEMA_FORMAT},
            None,
        ),
    ],
)
def test_invalid_tool_requests(client, fields, param):
    resp = chat(client, **fields)
    assert resp.status_code == 400, resp.text
    if param:
        assert resp.json()["error"]["param"] == param


def test_tools_need_a_template_that_knows_them(notokenizer_client):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [UNIT_TOOL]}
    resp = notokenizer_client.post(
        "/v1/chat/completions", content=json.dumps(body), headers=test_app.AUTH
    )
    assert resp.status_code == 400


def test_streamed_chat_with_n_opens_and_finishes_every_choice(client):
    resp = chat(client, n=2, max_tokens=3, stream=True, seed=4)
    events = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e[6:] not in ("", "[DONE]")]
    opened = [e["choices"][0]["index"] for e in events if "role" in e["choices"][0]["delta"]]
    finished = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(opened) == [0, 1] and sorted(finished) == [0, 1]
