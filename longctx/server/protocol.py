"""The OpenAI API as longctx serves it: request models in, response and chunk dicts out.

Requests are pydantic models. Every OpenAI parameter that changes what is generated is
either honoured or refused with a 400 naming it (`REFUSED`: audio, web search, reasoning
settings, the deprecated `functions`, `store`, and vLLM extensions we do not implement), never
ignored. Ignored are only fields that do not change the output: `user`, `metadata`,
`service_tier`, `prediction` (a latency hint), `prompt_cache_key`, `safety_identifier`, and
`strict` on function definitions (arguments are grammar-enforced only with tool_choice
required or named). Responses are plain dicts in the shapes of OpenAI's `text_completion`,
`chat.completion` and `chat.completion.chunk` objects, built by a formatter that follows each
request's outputs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from longctx.engine.outputs import RequestOutput
from longctx.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    REPETITION_PENALTY_RANGE,
    SamplingParams,
)
from longctx.server.tool_parser import ToolCallOutput
from longctx.structured_output import StructuredOutput
from longctx.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # of /v1/completions, as OpenAI's
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

NonEmptyText = Annotated[str, Field(min_length=1)]
MAX_CHOICES = 128
MIN_LOGPROB = -9999.0  # JSON has no -inf

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}


def parse_request(model: type[M], payload: object) -> M:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the parameter."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        # Strict: JSON's types as the schema states them (true is no integer, "5" no number).
        return model.model_validate(payload, strict=True)
    except ValidationError as e:
        # Of a union's errors, the member that matched deepest, with the fewest errors, says
        # best what is wrong (loc[:2] is the field and the member tried).
        errors = e.errors()
        paths = [_param_path(payload, err) for err in errors]
        members = Counter(tuple(err["loc"][:2]) for err in errors)
        best = max(
            range(len(errors)),
            key=lambda i: (len(paths[i]), -members[tuple(errors[i]["loc"][:2])]),
        )
        first = errors[best]
        param = ".".join(paths[best]) or None
        where = f"{param}: " if param else ""
        raise ApiError(400, f"{where}{first['msg']}", param=param, code="invalid_value") from None


def _param_path(payload: object, error: Mapping[str, Any]) -> list[str]:
    """The part of an error's location that names places in the body: pydantic also names the
    member of a union it tried (`prompt.list[int].0`), which is no parameter."""
    path, value, loc = [], payload, error["loc"]
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        elif error["type"] == "missing" and i == len(loc) - 1:
            pass  # the missing field itself
        else:
            continue
        path.append(str(part))
    return path


# --- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema. The schema is enforced whether or not strict is set."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object with a schema')
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.type == "json_schema":
            return StructuredOutput(json_schema=self.json_schema.json_schema)
        return None


# name -> (the value that means "off", why it is refused when set to anything else)
REFUSED: Mapping[str, tuple[Any, str]] = {
    "functions": (None, "the deprecated functions parameter is not supported: use tools"),
    "function_call": (None, "the deprecated function_call is not supported: use tool_choice"),
    "audio": (None, "audio output is not supported"),
    "modalities": (["text"], 'only modalities ["text"] is supported'),
    "web_search_options": (None, "web search is not supported"),
    "reasoning_effort": (None, "this server's models do not take reasoning_effort"),
    "verbosity": (None, "verbosity is not supported"),
    "store": (False, "completions are not stored (store=true is not supported)"),
    # vLLM's extensions that would otherwise pass unnoticed
    "min_p": (0.0, "min_p is not supported"),
    "use_beam_search": (False, "beam search is not supported"),
    "length_penalty": (1.0, "length_penalty (beam search) is not supported"),
    "guided_json": (None, "use response_format json_schema"),
    "guided_regex": (None, "guided_regex is not supported: use response_format"),
    "guided_choice": (None, "guided_choice is not supported: use response_format"),
    "guided_grammar": (None, "guided_grammar is not supported: use response_format"),
    "structured_outputs": (None, "use response_format"),
    "prompt_logprobs": (None, "use echo with logprobs on /v1/completions"),
    "allowed_token_ids": (None, "allowed_token_ids is not supported: use logit_bias"),
    "bad_words": ([], "bad_words is not supported: use logit_bias"),
    "truncate_prompt_tokens": (None, "prompts are never truncated"),
    "include_stop_str_in_output": (False, "stop strings are always cut from the output"),
    "skip_special_tokens": (True, "special tokens are always skipped in the text"),
    "add_special_tokens": (False, "add_special_tokens is not supported"),
    "chat_template": (None, "the model's own chat template is always used"),
    "chat_template_kwargs": (None, "chat_template_kwargs is not supported"),
    "continue_final_message": (False, "continue_final_message is not supported"),
    "add_generation_prompt": (True, "the generation prompt is always added"),
    "documents": (None, "documents is not supported"),
    "priority": (0, "request priorities are not supported"),
}


def _refuse_unsupported(data: Any) -> None:
    if not isinstance(data, dict):
        return
    for name, (off, why) in REFUSED.items():
        if data.get(name) not in (None, off):
            raise ApiError(400, why, param=name, code="unsupported_parameter")


def _nullable_properties(schema: dict[str, Any]) -> None:
    """A request's top-level null means the default (see _null_means_default): the schema
    says so for the optional fields, or a fuzzer rightly calls every accepted null a schema
    violation."""
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name in required or any(alt.get("type") == "null" for alt in prop.get("anyOf", [])):
            continue
        outer = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **outer}


class _GenerationRequest(BaseModel):
    """Fields both endpoints share. top_k, min_tokens, ignore_eos, stop_token_ids: vLLM's
    extensions of the OpenAI API."""

    # 1e999 decodes as inf: no sampling parameter means anything there.
    model_config = ConfigDict(
        extra="ignore", allow_inf_nan=False, json_schema_extra=_nullable_properties
    )

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # 0 and -1 (vLLM's spelling) both mean off
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # what a torch.Generator takes
    stop: NonEmptyText | list[NonEmptyText] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # the n choices of a prompt share its prefill
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(  # vLLM's extension
        1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None  # on /v1/completions too, as vLLM has it

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        _refuse_unsupported(data)
        # Clients that send every field write the unset ones as null.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if abs(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None,
            structured_output=self.structured_output(),
        )

    def structured_output(self) -> StructuredOutput | None:
        return self.response_format.structured_output() if self.response_format else None


Prompt = str | list[int]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_GenerationRequest):
    prompt: (
        NonEmptyText
        | TokenIds
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: int | None = Field(None, ge=1)  # unset: DEFAULT_MAX_TOKENS, within the room
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # with logprobs: the prompt tokens' logprobs too (prompt_logprobs)
    best_of: int | None = Field(None, json_schema_extra={"enum": [1, None]})
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

    @field_validator("prompt", mode="before")
    @classmethod
    def _some_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def prompts(self) -> list[Prompt]:
        """One prompt (text or token ids) per choice."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    # The schema says what ChatMessage._text_only lets through.
    model_config = ConfigDict(extra="ignore", json_schema_extra={"required": ["type", "text"]})
    type: str = Field(json_schema_extra={"const": "text"})
    text: str | None = Field(None, json_schema_extra={"type": "string"})


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments are enforced only with tool_choice required/named


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call an earlier assistant turn made, sent back with the conversation."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def as_template_call(self) -> dict[str, Any]:
        # Chat templates print the arguments with tojson: they expect an object, not text.
        try:
            arguments = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        function = {"name": self.function.name, "arguments": arguments}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list) and any(p.type != "text" or p.text is None for p in v):
            raise ValueError("only text content parts are supported")
        return v

    @model_validator(mode="after")
    def _calls_from_the_assistant(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def as_template_message(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.as_template_call() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    echo: bool = False  # vLLM's extension (echo the last message): refused

    @field_validator("echo")
    @classmethod
    def _no_chat_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is supported on /v1/completions only")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or ()]
        if len(set(names)) < len(names):
            raise ValueError("function names must be unique")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, v: Any, info: ValidationInfo) -> Any:
        names = [t.function.name for t in info.data.get("tools") or ()]
        if v not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice required or named needs tools")
        if isinstance(v, NamedToolChoice) and v.function.name not in names:
            raise ValueError(f"names {v.function.name!r}, which is not in tools")
        if v not in (None, "none", "auto") and info.data.get("response_format") is not None:
            if info.data["response_format"].type != "text":
                raise ValueError("tool_choice required or named excludes a response_format")
        return v

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def tool_names(self) -> set[str]:
        return {t.function.name for t in self.tools or ()} if self.template_tools() else set()

    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The functions the model must call (tool_choice required or named), else None."""
        choice = self.tool_choice
        if choice == "required":
            return [t.function.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(choice, NamedToolChoice):
            return [
                t.function.model_dump(exclude_none=True)
                for t in self.tools
                if t.function.name == choice.function.name
            ]
        return None

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field max_output_tokens came from, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message() for m in self.messages]

    def content_chars(self) -> int:
        tools = json.dumps(self.template_tools()) if self.template_tools() else ""
        return sum(len(m["content"]) for m in self.template_messages()) + len(tools)


# --- token names for logprobs -----------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenNames:
    """The text and the bytes of single tokens, as logprobs name them."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer
        self._bytes_of_char = _byte_decoder()
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        if token_id not in self._text:
            self._text[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return self._text[token_id]

    def decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            return "".join(self.text(t) for t in token_ids)
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

    def bytes(self, token_id: int) -> list[int]:
        # A byte-level token spells its bytes, so a token holding part of a UTF-8 character
        # still reports its real bytes; other tokens (added, non-byte-level) their UTF-8 text.
        raw = self._tokenizer.id_to_token(token_id) if self._tokenizer is not None else None
        if raw is not None and all(c in self._bytes_of_char for c in raw):
            return [self._bytes_of_char[c] for c in raw]
        return list(self.text(token_id).encode("utf-8"))


def _top(logprobs: Mapping[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


def _finite(lp: float) -> float:
    return max(lp, MIN_LOGPROB)


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[dict[int, float] | None],
    n: int,
    names: TokenNames,
    offset: int,
) -> dict:
    """The legacy completions logprobs object; text_offset counts from offset. A None entry
    (the first prompt token, which nothing predicts) has null logprobs."""
    tokens, chosen, tops, offsets = [], [], [], []
    for tok, lps in zip(token_ids, logprobs):
        text = names.text(tok)
        tokens.append(text)
        chosen.append(_finite(lps[tok]) if lps is not None else None)
        tops.append({names.text(t): _finite(lp) for t, lp in _top(lps, n)} if lps else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": chosen,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, float]], n: int, names: TokenNames
) -> dict:
    def entry(tok: int, lp: float) -> dict:
        return {"token": names.text(tok), "logprob": _finite(lp), "bytes": names.bytes(tok)}

    content = [
        {**entry(tok, lps[tok]), "top_logprobs": [entry(t, lp) for t, lp in _top(lps, n)]}
        for tok, lps in zip(token_ids, logprobs)
    ]
    return {"content": content}


# --- responses ---------------------------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    tokens_sent: int = 0
    text_offset: int = 0
    last: RequestOutput | None = None
    echoed: bool = False


class _Formatter:
    """Follows the outputs of one API request's engine requests (one per choice)."""

    def __init__(
        self,
        response_id: str,
        model: str,
        request_ids: list[str],
        names: TokenNames,
        top_logprobs: int | None,
        include_usage: bool = False,
    ) -> None:
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.names = names
        self.top_logprobs = top_logprobs
        self.include_usage = include_usage
        self._choices = {rid: _Choice(i) for i, rid in enumerate(request_ids)}

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        d = {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            d["usage"] = None
        return d

    def _advance(self, out: RequestOutput) -> tuple[_Choice, list[int], list[dict] | None]:
        """The choice, and the tokens (with logprobs) that out adds to what was sent."""
        choice = self._choices[out.request_id]
        new_ids = out.token_ids[choice.tokens_sent :]
        new_lps = out.logprobs[choice.tokens_sent :] if out.logprobs is not None else None
        choice.tokens_sent = len(out.token_ids)
        choice.last = out
        return choice, new_ids, new_lps

    def usage(self) -> dict:
        outs = [c.last for c in self._choices.values() if c.last is not None]
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(o.token_ids) for o in outs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def usage_chunks(self, obj: str) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self._envelope(obj, []), "usage": self.usage()}]

    def ordered(self, finals: Mapping[str, RequestOutput]) -> list[tuple[_Choice, RequestOutput]]:
        for rid, out in finals.items():
            self._choices[rid].last = out
        return [(c, c.last) for c in self._choices.values()]


class CompletionFormatter(_Formatter):
    OBJECT = "text_completion"

    def __init__(self, *args: Any, echo: bool = False, **kwargs: Any) -> None:
        """echo: each choice starts with its prompt (and, with logprobs, the prompt tokens'
        logprobs, the first one null)."""
        super().__init__(*args, **kwargs)
        self.echo = echo

    def opening_chunks(self) -> list[dict]:
        return []

    def _echoed(self, out: RequestOutput) -> tuple[str, dict | None]:
        """The prompt's text and logprobs object."""
        text = out.prompt if out.prompt is not None else self.names.decode(out.prompt_token_ids)
        logprobs = None
        if out.prompt_logprobs is not None:
            n = self.top_logprobs or 0
            logprobs = completion_logprobs(
                out.prompt_token_ids, out.prompt_logprobs, n, self.names, 0
            )
        return text, logprobs

    def _with_echo(
        self, out: RequestOutput, text: str, logprobs: dict | None
    ) -> tuple[str, dict | None]:
        echo_text, echo_lps = self._echoed(out)
        if echo_lps is not None and logprobs is not None:
            logprobs = {k: echo_lps[k] + logprobs[k] for k in logprobs}
        return echo_text + text, logprobs

    def _offset(self, out: RequestOutput) -> int:
        """Where the completion's text_offset starts: after the echoed prompt tokens."""
        if not self.echo:
            return 0
        return sum(len(self.names.text(t)) for t in out.prompt_token_ids)

    def chunks(self, out: RequestOutput) -> list[dict]:
        choice, new_ids, new_lps = self._advance(out)
        echo_now = self.echo and not choice.echoed and (bool(new_ids) or out.finished)
        if not out.new_text and not out.finished and not (new_ids and new_lps is not None):
            return []
        if echo_now and not choice.text_offset:
            choice.text_offset = self._offset(out)
        logprobs = None
        if new_lps is not None:
            logprobs = completion_logprobs(
                new_ids, new_lps, self.top_logprobs or 0, self.names, choice.text_offset
            )
        choice.text_offset += len(out.new_text)
        text = out.new_text
        if echo_now:
            choice.echoed = True
            text, logprobs = self._with_echo(out, text, logprobs)
        body = {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason if out.finished else None,
        }
        return [self._envelope(self.OBJECT, [body])]

    def closing_chunks(self) -> list[dict]:
        return self.usage_chunks(self.OBJECT)

    def response(self, finals: Mapping[str, RequestOutput]) -> dict:
        choices = []
        for choice, out in self.ordered(finals):
            logprobs, text = None, out.text
            if out.logprobs is not None:
                n = self.top_logprobs or 0
                offset = self._offset(out)
                logprobs = completion_logprobs(out.token_ids, out.logprobs, n, self.names, offset)
            if self.echo:
                text, logprobs = self._with_echo(out, text, logprobs)
            choices.append(
                {
                    "index": choice.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": out.finish_reason,
                }
            )
        return {**self._envelope(self.OBJECT, choices), "usage": self.usage()}


class ChatFormatter(_Formatter):
    CHUNK = "chat.completion.chunk"

    def __init__(self, *args: Any, tools: ToolCallOutput | None = None, **kwargs: Any) -> None:
        """tools: when the request has tools the model may call."""
        super().__init__(*args, **kwargs)
        self.tools = tools

    def opening_chunks(self) -> list[dict]:
        return [
            self._chunk(c.index, {"role": "assistant", "content": ""}, None, None)
            for c in self._choices.values()
        ]

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, reason: str | None) -> dict:
        body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope(self.CHUNK, [body])

    def chunks(self, out: RequestOutput) -> list[dict]:
        choice, new_ids, new_lps = self._advance(out)
        if not out.new_text and not out.finished and not (new_ids and new_lps is not None):
            return []
        logprobs = None
        if new_lps is not None:
            logprobs = chat_logprobs(new_ids, new_lps, self.top_logprobs or 0, self.names)
        delta = {"content": out.new_text} if out.new_text else {}
        reason = out.finish_reason if out.finished else None
        if self.tools is not None:
            delta, reason = self.tools.delta(out.request_id, out.new_text, reason)
            if not delta and reason is None and logprobs is None:
                return []
        return [self._chunk(choice.index, delta, logprobs, reason)]

    def closing_chunks(self) -> list[dict]:
        return self.usage_chunks(self.CHUNK)

    def response(self, finals: Mapping[str, RequestOutput]) -> dict:
        choices = []
        for choice, out in self.ordered(finals):
            logprobs = None
            if out.logprobs is not None:
                n = self.top_logprobs or 0
                logprobs = chat_logprobs(out.token_ids, out.logprobs, n, self.names)
            message, reason = {"role": "assistant", "content": out.text}, out.finish_reason
            if self.tools is not None:
                message, reason = self.tools.message(out.text, out.finish_reason)
            choices.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }
            )
        return {**self._envelope("chat.completion", choices), "usage": self.usage()}
