"""An app served by uvicorn on a loopback port from a thread of the test process: real
connections (disconnects, concurrency) without a subprocess or a model load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from longctx.entrypoints.serve_cmd import bind


@contextmanager
def live_server(app) -> Iterator[str]:
    """The server's base URL while the block runs."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def metric_values(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    """The metrics once no request runs or waits and no KV block is held (or at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metric_values(url)
        busy = m["longctx_num_requests_running"] + m["longctx_num_requests_waiting"]
        if (busy == 0 and m["longctx_kv_cache_blocks_used"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


ABORTS = 'longctx_requests_finished_total{finish_reason="abort"}'
