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
import dataclasses
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from longctx import __version__
from longctx.chat_prompt import ChatEncoder
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
from longctx.server.json_body import decode_json_body
from longctx.server.metrics import CONTENT_TYPE
from longctx.server.openapi import ServedLimits, openapi_document
from longctx.server.protocol import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
    Prompt,
    TokenNames,
    parse_request,
)
from longctx.server.tool_parser import ToolCallOutput, forced_tool_grammar, template_knows_tools
from longctx.structured_output import StructuredOutput, StructuredOutputError
from longctx.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
    # Web pages of these origins may call the server (besides loopback ones); "*": any.
    allowed_origins: tuple[str, ...] = ()
    # Parse special-token strings written in chat message content as control tokens (off:
    # content is text, see longctx/chat_prompt.py).
    chat_parse_special_tokens: bool = False

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise ConfigError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key must not be empty")
        object.__setattr__(self, "allowed_origins", normalize_origins(self.allowed_origins))


def normalize_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """Origins as browsers send them (lower case, no trailing slash); "*" stays."""
    normal = tuple(o.strip().rstrip("/").lower() for o in origins if o.strip())
    for o in normal:
        if o != "*" and not (urlsplit(o).scheme and urlsplit(o).hostname):
            raise ConfigError(f"allowed origin {o!r} is not scheme://host[:port] or *")
    return normal


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
        # FastAPI's own schema and docs pages are off: /openapi.json (behind the API key) is
        # built from the request models (see openapi.py).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(server.check_local)],
    )
    _add_error_handlers(app)
    _add_cors(app, config.allowed_origins)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_api_route(
        "/openapi.json",
        server.openapi,
        methods=["GET"],
        dependencies=[Depends(server.check_api_key)],
    )
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


LOOPBACK_ORIGIN = r"https?://(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?"


def _add_cors(app: FastAPI, allowed: tuple[str, ...]) -> None:
    """CORS headers for the origins check_local lets through, so that their pages can read
    the answers (and send the preflighted JSON POSTs)."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if "*" in allowed else list(allowed),
        allow_origin_regex=LOOPBACK_ORIGIN,
        allow_methods=["*"],
        allow_headers=["*"],
    )


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """A loopback origin (any scheme or port), or one of allowed ("*" allows any)."""
    if "*" in allowed or origin.rstrip("/").lower() in allowed:
        return True
    return is_loopback_host(urlsplit(origin).hostname)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


async def read_json(request: Request, limit: int) -> object:
    """The decoded JSON body (see json_body); over `limit` bytes is a 413, whether declared or
    sent chunked."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return decode_json_body(bytes(body))


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
        self._chat = ChatEncoder(tokenizer) if tokenizer else None
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

    async def openapi(self) -> JSONResponse:
        limits = ServedLimits(
            tuple(sorted(self._names)),
            self.engine.max_model_len,
            self.engine.model_config.vocab_size,
        )
        return JSONResponse(openapi_document(limits, api_key=self._key is not None))

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
        """A request sent by a web page (browsers add an Origin header to cross-site POSTs)
        must come from a loopback origin or an allowed one, as ollama's OLLAMA_ORIGINS does.
        With local_only it must also name a loopback host: a page can reach a server on
        127.0.0.1 through DNS rebinding (its own name resolving to 127.0.0.1), but the Host
        header still carries that name."""
        origin = request.headers.get("origin")
        if origin is not None and not origin_allowed(origin, self.config.allowed_origins):
            raise ApiError(
                403,
                f"requests from web pages of {origin} are refused; allow that origin with "
                "--allowed-origins",
                type_="permission_error",
                code="forbidden_origin",
            )
        host = urlsplit("//" + request.headers.get("host", "")).hostname
        if self.config.local_only and not is_loopback_host(host):
            raise ApiError(
                403,
                "this server only answers requests addressed to a loopback host name",
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
        params = []
        for _, ids in prompts:
            p = req.sampling_params(
                self._max_tokens(req.max_tokens, len(ids), "max_tokens", DEFAULT_MAX_TOKENS),
                req.logprobs,
            )
            if req.echo and req.logprobs is not None:
                p = dataclasses.replace(p, prompt_logprobs=req.logprobs)
            params.append(p)
        rid = f"cmpl-{uuid.uuid4().hex}"
        engine_requests = await self._engine_requests(rid, prompts, params, arrival)
        formatter = CompletionFormatter(
            rid,
            req.model or self.config.served_model_name,
            [r.request_id for r in engine_requests],
            self._token_names,
            req.logprobs,
            req.include_usage,
            echo=req.echo,
        )
        return await self._respond(request, engine_requests, formatter, req.stream)

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_request(ChatCompletionRequest, await read_json(request, self._body_limit))
        self._check_model(req.model)
        prompt = await self._chat_prompt_ids(req)
        max_tokens = self._max_tokens(req.max_output_tokens, len(prompt[1]), req.max_tokens_param)
        params = req.sampling_params(max_tokens, req.engine_logprobs)
        forced = req.forced_tools()
        if forced:
            grammar = forced_tool_grammar(
                forced, req.parallel_tool_calls, self.engine.grammars().token_literal
            )
            params = dataclasses.replace(params, structured_output=StructuredOutput(lark=grammar))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        engine_requests = await self._engine_requests(
            rid, [prompt], [params], arrival, grammar_param="tools" if forced else "response_format"
        )
        names = req.tool_names()
        formatter = ChatFormatter(
            rid,
            req.model or self.config.served_model_name,
            [r.request_id for r in engine_requests],
            self._token_names,
            req.top_logprobs,
            req.include_usage,
            tools=ToolCallOutput(names, req.parallel_tool_calls) if names else None,
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
        with self.loop.admitting():
            return prompt, await asyncio.to_thread(tokenizer.encode, prompt)

    async def _chat_prompt_ids(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        self._check_chars(req.content_chars(), "messages")
        tokenizer = self._tokenizer()  # says why there is no chat without one
        tools = req.template_tools()
        if tools and not template_knows_tools(tokenizer.chat_template):
            raise ApiError(
                400,
                "this model's chat template does not render tools in a tool-call format this "
                "server reads (Qwen2-style <tool_call> blocks)",
                param="tools",
            )
        with self.loop.admitting():
            return await asyncio.to_thread(
                self._chat.encode,
                req.template_messages(),
                self.config.chat_parse_special_tokens,
                tools,
            )

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
                400,
                f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
                code="invalid_value",
            )

    def _max_tokens(
        self, requested: int | None, num_prompt: int, param: str, default: int | None = None
    ) -> int:
        """requested, if the context limit leaves room for it (else a 400 naming both numbers,
        as OpenAI answers: no huge number reaches the engine); without one, default (or else
        all the room) within what the context limit and the KV cache leave."""
        limit = self.engine.max_model_len
        if requested is not None:
            if num_prompt < limit < num_prompt + requested:  # a prompt alone too long: check_fits
                raise ApiError(
                    400,
                    f"this model's context limit is {limit} tokens, but the prompt has "
                    f"{num_prompt} tokens and {param} asks for {requested} more "
                    f"({num_prompt + requested} in all); lower {param} or shorten the prompt",
                    param=param,
                    code="context_length_exceeded",
                )
            return requested
        room = min(limit, self.engine.runner.kv_capacity_tokens) - num_prompt
        return max(min(room, default) if default is not None else room, 1)  # none: check_fits

    async def _engine_requests(
        self,
        response_id: str,
        prompts: list[tuple[str | None, list[int]]],
        params: list[SamplingParams],
        arrival: float,
        grammar_param: str = "response_format",
    ) -> list[EngineRequest]:
        # check_fits reads only sizes fixed at start-up, so it is safe off the engine thread.
        for (_, ids), p in zip(prompts, params):
            self.engine.check_fits(len(ids), p)
            if p.structured_output is None:
                self.engine.check_params(p)
            else:  # a grammar takes milliseconds to check (a second for the first one)
                await asyncio.to_thread(self._check_grammar, p, grammar_param)
        out: list[EngineRequest] = []
        for (text, ids), p in zip(prompts, params):
            first = f"{response_id}-{len(out)}"  # the others of its p.n share its prefill
            out += [
                EngineRequest(
                    f"{response_id}-{len(out) + i}",
                    text,
                    ids,
                    p.for_choice(i),
                    arrival,
                    share_prompt_with=first if i else None,
                )
                for i in range(p.n)
            ]
        return out

    def _check_grammar(self, params: SamplingParams, param: str) -> None:
        try:
            self.engine.check_params(params)
        except StructuredOutputError as e:
            raise ApiError(400, str(e), param=param, code="invalid_value") from None

    async def _respond(
        self,
        request: Request,
        engine_requests: list[EngineRequest],
        formatter: CompletionFormatter | ChatFormatter,
        streaming: bool,
    ) -> Response:
        if await request.is_disconnected():  # gone while its prompt was tokenized
            raise ApiError(499, "the client closed the request", code="client_closed")
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
    """Every request's final output, or a 499 as soon as the client is gone (the caller's
    `async with stream` then aborts the requests)."""
    task = asyncio.ensure_future(stream.final_outputs())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ApiError(499, "the client closed the request", code="client_closed")
    finally:
        task.cancel()
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next message the
    server can receive is that one."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
