"""SIGTERM to a real `longctx serve` process with streams open: each stream ends with a final
event and `data: [DONE]`, the process exits 0 within a few seconds, and its log holds no
traceback."""

import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.tiny_chat_model import write_tiny_chat_model

EXIT_WITHIN_S = 8.0


@pytest.fixture
def server(tmp_path):
    model = write_tiny_chat_model(tmp_path / "model")
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "longctx.entrypoints.cli", "serve", "--model", str(model)]
            + ["--port", "0", "--device", "cpu", "--max-model-len", "4096"]
            + ["--kv-cache-gib", "0.02"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, _wait_until_serving(proc, log), log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_until_serving(proc: subprocess.Popen, log) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        found = re.search(r"serving .* on (http://\S+)", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.1)
    pytest.fail(f"server not up:\n{log.read_text()}")


def read_stream(url: str, path: str, body: dict, opened) -> list[str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: ") :])
                opened()
        return lines


def test_sigterm_ends_open_streams_and_exits_0(server):
    proc, url, log = server
    long = {"max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    bodies = [
        ("/v1/completions", {"prompt": "hello", **long}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **long}),
    ]
    events = []
    with ThreadPoolExecutor(len(bodies)) as pool:
        streams = [
            pool.submit(read_stream, url, path, body, lambda: events.append(1))
            for path, body in bodies
        ]
        deadline = time.monotonic() + 60
        while len(events) < 10 and time.monotonic() < deadline:  # both streams are flowing
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        results = [s.result() for s in streams]
    proc.wait(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 0, log.read_text()
    assert took < EXIT_WITHIN_S, took
    for lines in results:
        assert lines[-1] == "[DONE]"
        final = json.loads(lines[-2])
        assert final["error"]["code"] == "shutting_down", final
        assert len(lines) < 4000  # cut short, not run to the end
    assert "Traceback" not in log.read_text()
