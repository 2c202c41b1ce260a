"""`longctx serve`: the OpenAI-compatible HTTP server (see longctx/server)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs
from longctx.entrypoints.saved_kv_args import add_load_kv_arg, load_saved_kv
from longctx.errors import ConfigError, LongctxError
from longctx.server import DEFAULT_MAX_REQUEST_BYTES

API_KEY_ENV = "LONGCTX_API_KEY"
GRACEFUL_SHUTDOWN_S = 5  # after SIGTERM, how long open connections may take to finish


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over HTTP: POST /v1/completions and /v1/chat/completions "
        "(streaming with stream=true), GET /v1/models, /health and /metrics (Prometheus). "
        "Binds 127.0.0.1 unless --host says otherwise.",
    )
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    h.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free one)")
    h.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on /v1 requests (default: ${API_KEY_ENV})",
    )
    h.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="refuse request bodies larger than this with 413 (default: 32 MiB)",
    )
    h.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models lists (default: the model file or "
        "directory name)",
    )
    h.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated origins (scheme://host[:port]) whose web pages may call the "
        "server, besides loopback ones; * allows any (default: loopback origins only)",
    )
    h.add_argument(
        "--chat-parse-special-tokens",
        action="store_true",
        help="parse special-token strings (<|im_start|>...) written in chat message content as "
        "control tokens; by default content is plain text, so no user can forge a turn",
    )
    add_load_kv_arg(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    api_key = _api_key(args)
    if args.max_request_bytes <= 0:
        raise ConfigError(f"--max-request-bytes must be positive, got {args.max_request_bytes}")
    uvicorn = _import_server_deps()
    from longctx.server.app import is_loopback_host, normalize_origins

    args.allowed_origins = normalize_origins(args.allowed_origins.split(","))

    sock = bind(args.host, args.port)  # before the slow model load: a taken port fails at once
    if api_key is None and not is_loopback_host(args.host):
        print(
            f"longctx: warning: serving on {args.host} without an API key; anyone who can reach "
            f"it can use the model (set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    app, name, engine_loop = _build_app(args, api_key)
    host, port = sock.getsockname()[:2]
    print(f"longctx: serving {name!r} on {_url(host, port)}", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        app,
        log_level="info" if args.verbose else "warning",
        access_log=args.verbose,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down, to the handler it
    # found: this one, so that a server stopped by SIGTERM exits 0 rather than by the signal.
    signal.signal(signal.SIGTERM, _stopped_by_sigterm)
    _graceful_server(uvicorn, config, engine_loop.stop_soon).run(sockets=[sock])
    return 0


def _stopped_by_sigterm(signum: int, frame: FrameType | None) -> None:
    pass  # the server has shut down already


def _graceful_server(uvicorn, config, on_exit: Callable[[], None]):
    """A uvicorn server that, when told to exit, first ends the engine's requests: open
    streams then close with an error event and `data: [DONE]` instead of hanging until the
    graceful timeout cuts them."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    return Server(config)


def _api_key(args: argparse.Namespace) -> str | None:
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ConfigError(f"the API key (--api-key or ${API_KEY_ENV}) is empty")
    return key


def _import_server_deps():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise LongctxError(f"the server needs {e.name}: pip install 'longctx[serve]'") from None
    return uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise LongctxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _build_app(args: argparse.Namespace, api_key: str | None):
    from longctx.entrypoints.llm import LLM  # heavy imports only once the flags are valid
    from longctx.server.app import ServerConfig, create_app, is_loopback_host
    from longctx.server.engine_loop import EngineLoop

    llm = LLM(**llm_kwargs(args))
    load_saved_kv(llm, args.load_kv, progress=True)
    engine = llm.engine
    source = engine.checkpoint.source
    name = args.served_model_name or _model_name(source)
    aliases = tuple(a for a in (args.model, source, str(Path(source).resolve())) if a)
    config = ServerConfig(
        served_model_name=name,
        model_aliases=aliases,
        api_key=api_key,
        max_request_bytes=args.max_request_bytes,
        local_only=is_loopback_host(args.host),
        allowed_origins=args.allowed_origins,
        chat_parse_special_tokens=args.chat_parse_special_tokens,
    )
    loop = EngineLoop(engine)
    return create_app(loop, config), name, loop


def _model_name(source: str) -> str:
    path = Path(source)
    return path.stem if path.suffix.lower() == ".gguf" else path.name
