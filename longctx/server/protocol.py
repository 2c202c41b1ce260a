"""The OpenAI API as longctx serves it: request models in, response and chunk dicts out.

Requests are pydantic models that ignore fields we do not use (clients send many) but refuse
the ones whose meaning we would silently change (n > 1, echo, penalties, logit_bias). Responses
are plain dicts in the shapes of OpenAI's `text_completion`, `chat.completion` and
`chat.completion.chunk` objects, built by a formatter that follows each request's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

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
from longctx.sampling_params import SamplingParams
from longctx.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20
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
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        where = f"{param}: " if param else ""
        raise ApiError(400, f"{where}{first['msg']}", param=param, code="invalid_value") from None


# --- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields both endpoints share. top_k, min_tokens, ignore_eos, stop_token_ids: vLLM's
    extensions of the OpenAI API."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # 0 and -1 (vLLM's spelling) both mean off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients that send every field write the unset ones as null.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
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
        )


Prompt = str | list[int]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
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
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list) and any(p.type != "text" or p.text is None for p in v):
            raise ValueError("only text content parts are supported")
        return v

    def as_template_message(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content)
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]

    def content_chars(self) -> int:
        return sum(len(m["content"]) for m in self.template_messages())


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
    token_ids: list[int], logprobs: list[dict[int, float]], n: int, names: TokenNames, offset: int
) -> dict:
    """The legacy completions logprobs object; text_offset counts from the completion's start."""
    tokens, chosen, tops, offsets = [], [], [], []
    for tok, lps in zip(token_ids, logprobs):
        text = names.text(tok)
        tokens.append(text)
        chosen.append(_finite(lps[tok]))
        tops.append({names.text(t): _finite(lp) for t, lp in _top(lps, n)})
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

    def opening_chunks(self) -> list[dict]:
        return []

    def chunks(self, out: RequestOutput) -> list[dict]:
        choice, new_ids, new_lps = self._advance(out)
        if not out.new_text and not out.finished and not (new_ids and new_lps is not None):
            return []
        logprobs = None
        if new_lps is not None:
            logprobs = completion_logprobs(
                new_ids, new_lps, self.top_logprobs or 0, self.names, choice.text_offset
            )
        choice.text_offset += len(out.new_text)
        body = {
            "index": choice.index,
            "text": out.new_text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason if out.finished else None,
        }
        return [self._envelope(self.OBJECT, [body])]

    def closing_chunks(self) -> list[dict]:
        return self.usage_chunks(self.OBJECT)

    def response(self, finals: Mapping[str, RequestOutput]) -> dict:
        choices = []
        for choice, out in self.ordered(finals):
            logprobs = None
            if out.logprobs is not None:
                n = self.top_logprobs or 0
                logprobs = completion_logprobs(out.token_ids, out.logprobs, n, self.names, 0)
            choices.append(
                {
                    "index": choice.index,
                    "text": out.text,
                    "logprobs": logprobs,
                    "finish_reason": out.finish_reason,
                }
            )
        return {**self._envelope(self.OBJECT, choices), "usage": self.usage()}


class ChatFormatter(_Formatter):
    CHUNK = "chat.completion.chunk"

    def opening_chunks(self) -> list[dict]:
        return [self._chunk(0, {"role": "assistant", "content": ""}, None, None)]

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
            choices.append(
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": logprobs,
                    "finish_reason": out.finish_reason,
                }
            )
        return {**self._envelope("chat.completion", choices), "usage": self.usage()}
