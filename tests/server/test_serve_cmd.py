"""`longctx serve` flag handling: mistakes fail at once, in one line, before the model loads."""

import os
import socket
import subprocess
import sys

import pytest


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longctx.entrypoints.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("longctx: error:")]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_help_documents_the_server_flags():
    out = serve("--help").stdout
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--max-request-bytes",
        "--served-model-name",
        "--max-model-len",
        "--dca-chunk-size",
        "--allowed-origins",
        "--chat-parse-special-tokens",
    ):
        assert flag in out


def test_a_taken_port_fails_before_loading_the_model():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = serve("--port", str(port), "--model", "/nonexistent/model")
    assert_one_line_error(proc, "cannot listen", str(port))


@pytest.mark.parametrize(
    "args,env,word",
    [
        (["--max-request-bytes", "0"], {}, "--max-request-bytes"),
        ([], {"LONGCTX_API_KEY": " "}, "API key"),
        (["--allowed-origins", "app.example"], {}, "scheme://host"),
    ],
)
def test_bad_flags(args, env, word):
    assert_one_line_error(serve(*args, env=env), word)
