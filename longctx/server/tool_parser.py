"""Tool calls in the format of Qwen2 / Qwen2.5's chat template (Hermes style):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, possibly several. Small models often write one call's JSON alone, without
the tags: a text that is nothing but such an object is read as that call too (streaming holds
back a text that starts with "{" until it ends, to tell). `parse_tool_calls` reads a finished
text,
`ToolCallStream` the same text as it streams (content goes out at once, except a tail that
could still open a block; a block goes out whole as one `delta.tool_calls` entry once it
closes). A block that does not parse as a call to a declared function stays plain content.
`forced_tool_grammar` is the grammar that makes the model write such calls (tool_choice
"required" or a named function).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from longctx.structured_output import json_schema_lark

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` and writes calls in the format read here."""
    return chat_template is not None and "tools" in chat_template and OPEN in chat_template


def parse_call(body: str, names: set[str]) -> ToolCall | None:
    """One block's JSON as a call of a declared function, or None."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished text, read as it would have streamed: blocks that parse
    are calls, the rest is content (stripped when there are calls, None if empty)."""
    stream = ToolCallStream(names)
    events = stream.feed(text) + stream.finish()
    calls = [e.call for e in events if e.call is not None]
    content = "".join(e.content for e in events)
    if calls:
        content = content.strip()
    return (content or None), calls


def _open_prefix_len(text: str) -> int:
    """Length of the longest tail of text that is a proper prefix of OPEN."""
    for n in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


@dataclass
class StreamEvent:
    content: str = ""
    call: ToolCall | None = None


class ToolCallStream:
    """Splits streamed text into content pieces and whole tool calls."""

    def __init__(self, names: set[str]) -> None:
        self._names = names
        self._buffer = ""  # text not sent yet: a possible OPEN prefix, or an open block
        self._in_block = False
        self._started = False  # whether anything but leading whitespace has been seen
        self._bare = False  # the text opened with "{": maybe one call without tags
        self.num_calls = 0

    def feed(self, text: str) -> list[StreamEvent]:
        self._buffer += text
        if not self._started:
            head = self._buffer.lstrip()
            if not head:
                return []
            self._started = True
            self._bare = head.startswith("{")
        if self._bare:
            return []
        events: list[StreamEvent] = []
        while True:
            if self._in_block:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return events
                block = self._buffer[: end + len(CLOSE)]
                self._buffer = self._buffer[end + len(CLOSE) :]
                self._in_block = False
                events.append(self._block_event(block))
            else:
                start = self._buffer.find(OPEN)
                if start < 0:
                    keep = _open_prefix_len(self._buffer)
                    sendable = self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(sendable) :]
                    return events + self._content(sendable)
                events += self._content(self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN) :]
                self._in_block = True

    def finish(self) -> list[StreamEvent]:
        """At the end of the text: an unclosed block that parses is a call, else content."""
        rest, self._buffer = self._buffer, ""
        if self._bare:
            self._bare = False
            call = parse_call(rest.strip(), self._names)
            if call is not None:
                self.num_calls += 1
                return [StreamEvent(call=call)]
            self._buffer = rest  # not a call: read it as any other text
            return self.feed("") + self.finish()
        if self._in_block:
            self._in_block = False
            return [self._block_event(rest, closed=False)]
        return self._content(rest)

    def _block_event(self, block: str, closed: bool = True) -> StreamEvent:
        body = block[: -len(CLOSE)] if closed else block
        call = parse_call(body.strip(), self._names)
        if call is None:
            return StreamEvent(content=OPEN + block)
        self.num_calls += 1
        return StreamEvent(call=call)

    def _content(self, text: str) -> list[StreamEvent]:
        # Whitespace right around the calls is the template's layout, not an answer.
        if self.num_calls and not text.strip():
            return []
        return [StreamEvent(content=text)] if text else []


def forced_tool_grammar(
    tools: Sequence[Mapping[str, Any]], parallel: bool, token: Callable[[str], str]
) -> str:
    """A Lark grammar (llguidance's dialect) for one call, or one or more with parallel, of
    the given functions ({"name", "parameters"} each): tagged blocks, or one call's JSON
    alone (what small models write by habit; stopping after it is their habit too).
    token(text): the grammar's spelling of a tag (a special token or a literal string)."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": t.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    repeat = ' ("\\n" call)*' if parallel else ""
    return (
        f"start: body | call{repeat}\n"
        f'call: {token(OPEN)} "\\n" body "\\n" {token(CLOSE)}\n'
        f"body: {json_schema_lark(schema)}\n"
    )


class ToolCallOutput:
    """One chat request's outputs with tools: each choice's text becomes content and
    tool_calls, in a whole message or in stream deltas. Without parallel_tool_calls only the
    first call counts."""

    def __init__(self, names: set[str], parallel: bool) -> None:
        self._names = names
        self._limit = None if parallel else 1
        self._streams: dict[str, ToolCallStream] = {}
        self._sent: dict[str, int] = {}  # calls sent per choice

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, calls = parse_tool_calls(text, self._names)
        calls = calls[: self._limit]
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.as_dict() for c in calls]
        return message, _reason(finish_reason, bool(calls))

    def delta(
        self, request_id: str, new_text: str, finish_reason: str | None
    ) -> tuple[dict, str | None]:
        """The delta of a stream update (finish_reason set on the last one)."""
        stream = self._streams.setdefault(request_id, ToolCallStream(self._names))
        events = stream.feed(new_text)
        if finish_reason is not None:
            events += stream.finish()
        delta: dict[str, Any] = {}
        content = "".join(e.content for e in events)
        if content:
            delta["content"] = content
        calls = []
        for call in (e.call for e in events if e.call is not None):
            index = self._sent.get(request_id, 0)
            if self._limit is None or index < self._limit:
                calls.append({"index": index, **call.as_dict()})
                self._sent[request_id] = index + 1
        if calls:
            delta["tool_calls"] = calls
        return delta, _reason(finish_reason, self._sent.get(request_id, 0) > 0)


def _reason(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
