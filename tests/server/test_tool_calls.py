"""Tool calls and structured output with the default model (Qwen2.5-Coder-0.5B-Instruct) on the
CPU, driven by the openai client in process: a tool-call round trip (call -> tool result ->
final answer), streaming and not; tool_choice required / named forced by the grammar; tool
messages and assistant tool_calls accepted back; response_format json_object parses."""

import json

import openai
import pytest
from fastapi.testclient import TestClient

from longctx import LLM
from longctx.server.app import ServerConfig, create_app
from longctx.server.engine_loop import EngineLoop

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time of a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
RESULT = json.dumps({"city": "Paris", "temperature_c": 11, "conditions": "light rain"})
ANSWER_ASK = "What is the weather in Paris? Use the tool, then answer in one sentence."


@pytest.fixture(scope="module")
def client():
    engine = LLM(device="cpu", max_model_len=2048, kv_cache_gib=0.25).engine
    with TestClient(create_app(EngineLoop(engine), ServerConfig("m"))) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)


def create(client, stream, **kw):
    kw = {"model": "m", "temperature": 0, "max_tokens": 60, **kw}
    if not stream:
        return client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as events:  # the client reassembles the deltas
        for _ in events:
            pass
        return events.get_final_completion().choices[0]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client, stream):
    messages = [{"role": "user", "content": ANSWER_ASK}]
    first = create(client, stream, messages=messages, tools=[WEATHER, TIME])
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]
    # tool_choice "none": answer from the result (this small model repeats its call when
    # it may still call tools).
    final = create(client, stream, messages=messages, tools=[WEATHER, TIME], tool_choice="none")
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert "rain" in final.message.content.lower()


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_force_a_valid_call(client, stream):
    chat = [{"role": "user", "content": "Hello! How are you today?"}]  # no reason to call
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, name in (("required", None), (named, "get_time")):
        out = create(client, stream, messages=chat, tools=[WEATHER, TIME], tool_choice=choice)
        assert out.finish_reason == "tool_calls", out.message
        assert out.message.tool_calls
        for call in out.message.tool_calls:
            assert call.function.name in ({name} if name else {"get_weather", "get_time"})
            schema = (TIME if call.function.name == "get_time" else WEATHER)["function"]
            assert set(json.loads(call.function.arguments)) == set(schema["parameters"]["required"])


def test_json_object_response_parses(client):
    ask = [{"role": "user", "content": "Give a JSON object describing Paris: name, country."}]
    out = create(client, False, messages=ask, response_format={"type": "json_object"})
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(out.message.content), dict)
