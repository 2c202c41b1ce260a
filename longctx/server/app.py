"""The HTTP face of the engine: an OpenAI-compatible FastAPI app over an EngineLoop.

A request is refused as early and as cheaply as possible, before it costs KV memory: the API key
(401) before the body is read, the body size (413) while it is read, then JSON and fields
(400), the model name (404), a character count that no prompt within the context limit can
reach (400, before tokenizing) and finally the engine's own check of the token count and KV
capacity (400). Tokenizing and chat templating run in worker threads, the engine on its own
thread: the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from longctx import __version__
from longctx.engine.outputs import RequestOutput
from longctx.errors import ConfigError, LongctxError, OutOfKVMemoryError, PromptTooLongError
from longctx.sampling_params import SamplingParams
from longctx.server import DEFAULT_MAX_REQUEST_BYTES
from longctx.server.engine_loop import (
    EngineLoop,
    EngineRequest,
    EngineStepError,
    EngineStopped,
    OutputStream,
)
from longctx.server.metrics import CONTENT_TYPE
from longctx.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
    Prompt,
    TokenNames,
    parse_request,
)
from longctx.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    """served_model_name is what /v1/models lists; requests may also name any of model_aliases
    (e.g. the model path) or leave `model` out. local_only: for a server bound to loopback,
    refuse requests addressed to another host name or sent by a web page (see check_local)."""

    served_model_name: str
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    local_only: bool = False  # see _Server.check_local

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise ConfigError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key must not be empty")


def create_app(engine_loop: EngineLoop, config: ServerConfig) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.shutdown)

    server = _Server(engine_loop, config)
    app = FastAPI(
        title="longctx",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,  # no schema or docs pages: nothing to serve without the API key
        dependencies=[Depends(server.check_local)],
    )
    _add_error_handlers(app)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_api_key)])
    v1.add_api_route("/models", server.models, methods=["GET"])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", server.chat_completions, methods=["POST"])
    app.include_router(v1)
    return app


# --- errors ------------------------------------------------------------------------------------


def error_for(e: Exception) -> ApiError:
    """The API error an exception is answered with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, OutOfKVMemoryError):
        return ApiError(400, str(e), code="kv_cache_too_small")
    if isinstance(e, LongctxError):
        return ApiError(400, str(e), code="invalid_value")
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), type_="server_error", code="shutting_down")
    if isinstance(e, EngineStepError):
        return ApiError(500, str(e), type_="server_error", code="internal_error")
    return ApiError(500, "internal server error", type_="server_error", code="internal_error")


def _add_error_handlers(app: FastAPI) -> None:
    async def answer(request: Request, e: Exception) -> JSONResponse:
        error = error_for(e)
        if error.status >= 500:
            log.error("%s %s failed: %r", request.method, request.url.path, e)
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        error = ApiError(e.status_code, str(e.detail), code=_http_code(e.status_code))
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    for kind in (ApiError, LongctxError, EngineStepError, EngineStopped, Exception):
        app.add_exception_handler(kind, answer)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


async def read_json(request: Request, limit: int) -> object:
    """The decoded JSON body; over `limit` bytes is a 413, whether declared or sent chunked."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")


# --- the routes ----------------------------------------------------------------------------------


class _Server:
    def __init__(self, engine_loop: EngineLoop, config: ServerConfig) -> None:
        self.loop = engine_loop
        self.engine = engine_loop.engine
        self.config = config
        self.created = int(time.time())
        self._names = {config.served_model_name, *config.model_aliases}
        self._key = config.api_key.encode() if config.api_key is not None else None
        self._token_names = TokenNames(self.engine.tokenizer)
        tokenizer = self.engine.tokenizer
        # No prompt of more characters than this can fit: see max_token_chars.
        self._max_prompt_chars = (
            self.engine.max_model_len * max_token_chars(tokenizer) if tokenizer else None
        )

    # --- plain GETs ------------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        if self.loop.is_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    async def metrics(self) -> Response:
        return Response(self.loop.metrics.render(self.loop.stats()), media_type=CONTENT_TYPE)

    async def models(self) -> JSONResponse:
        card = {
            "id": self.config.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "longctx",
            "root": self.engine.checkpoint.source,
            "max_model_len": self.engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def check_local(self, request: Request) -> None:
        """With local_only, a request must name a loopback host and come from no web page of
        another origin. A web page can reach a server on 127.0.0.1 through DNS rebinding (its
        own name resolving to 127.0.0.1: the Host header still carries that name) or by a
        cross-site POST (browsers send an Origin header with those)."""
        if not self.config.local_only:
            return
        origin = request.headers.get("origin")
        host_ok = is_loopback_host(urlsplit("//" + request.headers.get("host", "")).hostname)
        origin_ok = origin is None or is_loopback_host(urlsplit(origin).hostname)
        if not (host_ok and origin_ok):
            raise ApiError(
                403,
                "this server only answers requests to a loopback address, and none from web "
                "pages of other sites",
                type_="permission_error",
                code="forbidden_origin",
            )

    async def check_api_key(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                type_="authentication_error",
                code="invalid_api_key",
            )

    # --- generation ------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_request(CompletionRequest, await read_json(request, self._body_limit))
        self._check_model(req.model)
        prompts = [await self._prompt_ids(p) for p in req.prompts()]
        params = [req.sampling_params(req.max_tokens, req.logprobs)] * len(prompts)
        rid = f"cmpl-{uuid.uuid4().hex}"
        engine_requests = self._engine_requests(rid, prompts, params, arrival)
        formatter = CompletionFormatter(
            rid,
            req.model or self.config.served_model_name,
            [r.request_id for r in engine_requests],
            self._token_names,
            req.logprobs,
            req.include_usage,
        )
        return await self._respond(request, engine_requests, formatter, req.stream)

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_request(ChatCompletionRequest, await read_json(request, self._body_limit))
        self._check_model(req.model)
        prompt = await self._chat_prompt_ids(req)
        max_tokens = self._max_tokens(req.max_output_tokens, len(prompt[1]))
        params = req.sampling_params(max_tokens, req.engine_logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        engine_requests = self._engine_requests(rid, [prompt], [params], arrival)
        formatter = ChatFormatter(
            rid,
            req.model or self.config.served_model_name,
            [r.request_id for r in engine_requests],
            self._token_names,
            req.top_logprobs,
            req.include_usage,
        )
        return await self._respond(request, engine_requests, formatter, req.stream)

    @property
    def _body_limit(self) -> int:
        return self.config.max_request_bytes

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in self._names:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves "
                f"{self.config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if not isinstance(prompt, str):
            self._check_token_ids(prompt)
            return None, list(prompt)
        self._check_chars(len(prompt), "prompt")
        tokenizer = self._tokenizer()
        return prompt, await asyncio.to_thread(tokenizer.encode, prompt)

    async def _chat_prompt_ids(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        self._check_chars(req.content_chars(), "messages")
        tokenizer = self._tokenizer()
        return await asyncio.to_thread(_render_chat, tokenizer, req.template_messages())

    def _tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids")
        return self.engine.tokenizer

    def _check_chars(self, chars: int, param: str) -> None:
        if self._max_prompt_chars is not None and chars > self._max_prompt_chars:
            raise ApiError(
                400,
                f"the {param} has {chars} characters, more than any prompt within the context "
                f"limit of {self.engine.max_model_len} tokens can have",
                param=param,
                code="context_length_exceeded",
            )

    def _check_token_ids(self, ids: list[int]) -> None:
        vocab = self.engine.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(
                400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )

    def _max_tokens(self, requested: int | None, num_prompt: int) -> int:
        """requested, or else all the room the context limit and the KV cache leave."""
        if requested is not None:
            return requested
        room = min(self.engine.max_model_len, self.engine.runner.kv_capacity_tokens) - num_prompt
        return max(room, 1)  # no room: check_fits says why

    def _engine_requests(
        self,
        response_id: str,
        prompts: list[tuple[str | None, list[int]]],
        params: list[SamplingParams],
        arrival: float,
    ) -> list[EngineRequest]:
        # check_fits reads only sizes fixed at start-up, so it is safe off the engine thread.
        for (_, ids), p in zip(prompts, params):
            self.engine.check_fits(len(ids), p)
        return [
            EngineRequest(f"{response_id}-{i}", text, ids, p, arrival)
            for i, ((text, ids), p) in enumerate(zip(prompts, params))
        ]

    async def _respond(
        self,
        request: Request,
        engine_requests: list[EngineRequest],
        formatter: CompletionFormatter | ChatFormatter,
        streaming: bool,
    ) -> Response:
        stream = self.loop.open(engine_requests)
        if streaming:
            # The generator aborts on cancellation (client gone); the background task covers
            # a response cancelled before the generator ever started.
            return StreamingResponse(
                _sse(stream, formatter),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                background=BackgroundTask(stream.close),
            )
        async with stream:
            finals = await _until_finished(request, stream)
        return JSONResponse(formatter.response(finals))


def is_loopback_host(host: str | None) -> bool:
    """localhost or an address in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def max_token_chars(tokenizer: Tokenizer) -> int:
    """An upper bound on the characters of text one token stands for: a vocabulary entry is at
    least as long as its text (byte-level BPE spells each byte as one character), so a prompt of
    more than max_model_len * this many characters cannot fit."""
    return max(map(len, tokenizer.backend.get_vocab(with_added_tokens=True)))


def _render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(messages)
    return text, tokenizer.encode(text)


async def _sse(
    stream: OutputStream, formatter: CompletionFormatter | ChatFormatter
) -> AsyncIterator[str]:
    """Server-sent events: one `data: {chunk}` per update, then `data: [DONE]`. An error after
    the 200 went out is sent as an error event."""
    async with stream:
        for chunk in formatter.opening_chunks():
            yield _event(chunk)
        try:
            async for out in stream:
                for chunk in formatter.chunks(out):
                    yield _event(chunk)
            for chunk in formatter.closing_chunks():
                yield _event(chunk)
        except Exception as e:
            yield _event(error_for(e).body())
        yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _until_finished(request: Request, stream: OutputStream) -> dict[str, RequestOutput]:
    """Every request's final output, or a 499 as soon as the client is seen to be gone (the
    caller's `async with stream` then aborts the requests)."""
    task = asyncio.ensure_future(stream.final_outputs())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request", code="client_closed")
    finally:
        task.cancel()
