"""The Qwen2.5 (Hermes) tool-call format: whole texts and the same texts streamed in pieces."""

import json

import pytest

from longctx.server.tool_parser import ToolCallStream, parse_tool_calls

NAMES = {"get_weather", "get_time"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'


def args(call):
    return json.loads(call.arguments)


def test_one_call():
    content, calls = parse_tool_calls(CALL, NAMES)
    assert content is None and [c.name for c in calls] == ["get_weather"]
    assert args(calls[0]) == {"city": "Paris"} and calls[0].id.startswith("call_")


def test_several_calls_and_text_before_them():
    content, calls = parse_tool_calls("Let me check.\n" + CALL + "\n" + CALL2, NAMES)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2


def test_an_unclosed_last_block_that_parses_is_a_call():
    content, calls = parse_tool_calls(CALL.removesuffix("</tool_call>"), NAMES)
    assert content is None and calls[0].name == "get_weather"


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off
        "no calls at all, just <tool_ and text",
    ],
)
def test_malformed_output_stays_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_a_bad_block_next_to_a_good_one_keeps_the_good_call():
    bad = "<tool_call>\n{oops}\n</tool_call>"
    content, calls = parse_tool_calls(CALL + "\n" + bad, NAMES)
    assert [c.name for c in calls] == ["get_weather"] and content == bad


def test_arguments_written_as_a_json_string():
    text = '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>'
    assert args(parse_tool_calls(text, NAMES)[1][0]) == {"zone": "UTC"}


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_streaming_in_pieces_gives_the_same_result(piece):
    text = "Sure <b>now</b>: " + CALL + "\n" + CALL2
    stream = ToolCallStream(NAMES)
    events = []
    for i in range(0, len(text), piece):
        events += stream.feed(text[i : i + piece])
    events += stream.finish()
    content = "".join(e.content for e in events)
    assert content == "Sure <b>now</b>: "
    assert [e.call.name for e in events if e.call] == ["get_weather", "get_time"]


def test_streaming_holds_back_only_a_possible_opening_tag():
    stream = ToolCallStream(NAMES)
    assert [e.content for e in stream.feed("a <tool")] == ["a "]
    assert [e.content for e in stream.feed("box> b")] == ["<toolbox> b"]
    assert stream.finish() == []


BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_a_bare_call_object_is_a_call_whole_or_streamed(piece):
    assert [c.name for c in parse_tool_calls("\n" + BARE + "\n", NAMES)[1]] == ["get_weather"]
    stream = ToolCallStream(NAMES)
    events = []
    for i in range(0, len(BARE), piece):
        events += stream.feed(BARE[i : i + piece])
    assert events == []  # held back until the end tells
    events = stream.finish()
    assert len(events) == 1 and events[0].call.name == "get_weather"


@pytest.mark.parametrize("text", ['{"answer": 42}', '{"name": "get_weather"} and more'])
def test_other_text_opening_with_a_brace_is_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])
