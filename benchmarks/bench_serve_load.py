"""Load test of `longctx serve`: concurrent streaming clients on loopback.

Starts a server (or targets --url), then CLIENTS asyncio clients each send REQUESTS streaming
completions one after another, prompts of uniformly drawn lengths, ignore_eos so every request
generates exactly --max-tokens. Reports throughput (requests/s, output tokens/s), time to first
token and inter-token latency percentiles as the clients see them, and failures (should be 0).
Bounded in count (clients x requests) and in time (--time-limit cancels what is left, counted
as not finished), so it always stops by itself. Loopback only.

  .venv/bin/python benchmarks/bench_serve_load.py --clients 8 --requests 3 --max-tokens 32 \
      --offline-baseline [-- ENGINE FLAGS FOR THE SERVER]
  .venv/bin/python benchmarks/bench_serve_load.py --url http://127.0.0.1:8000 --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402

WORDS = (
    "the model reads a long document and answers questions about what it found in the text "
    "while the server batches many requests together so that each step of the engine serves "
    "every client at once and the cache holds keys and values for all of them"
).split()


@dataclass
class Result:
    prompt_chars: int
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between streamed chunks (~1 token each)
    prompt_tokens: int = 0
    output_tokens: int = 0


def make_prompt(rng: random.Random, tokens: int) -> str:
    # Each " word" of WORDS is one token for Qwen2's tokenizer; usage reports the exact count.
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Result:
    result = Result(prompt_chars=len(prompt))
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c["text"] for c in chunk["choices"]):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.ok = result.output_tokens > 0
    return result


async def client_task(
    client: httpx.AsyncClient, prompts: list[str], max_tokens: int, results: list[Result]
) -> None:
    for prompt in prompts:
        results.append(await one_request(client, prompt, max_tokens))


def make_plans(args: argparse.Namespace) -> list[list[str]]:
    """Each client's prompts, in order."""
    rng = random.Random(args.seed)
    return [
        [
            make_prompt(rng, rng.randint(args.min_prompt_tokens, args.max_prompt_tokens))
            for _ in range(args.requests)
        ]
        for _ in range(args.clients)
    ]


async def run_load(
    args: argparse.Namespace, url: str, plans: list[list[str]]
) -> tuple[list[Result], int, float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 1)
    timeout = httpx.Timeout(args.time_limit)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        await one_request(client, "warm up", 2)
        results: list[Result] = []
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(client_task(client, p, args.max_tokens, results)) for p in plans
        ]
        _, late = await asyncio.wait(tasks, timeout=args.time_limit)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        elapsed = time.perf_counter() - start
    planned = args.clients * args.requests
    return results, planned - len(results), elapsed


def offline_baseline(args: argparse.Namespace, plans: list[list[str]]) -> dict:
    """The same prompts through LLM.generate in this process, at most `clients` running at once
    (max_num_seqs), as the clients keep them: the engine's throughput without HTTP."""
    from longctx import LLM, SamplingParams
    from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    flags = parser.parse_args((["--model", args.model] if args.model else []) + args.server_args)
    flags.max_num_seqs = min(flags.max_num_seqs, args.clients)
    llm = LLM(**llm_kwargs(flags))
    llm.generate(["warm up"], SamplingParams(max_tokens=2))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = [p for wave in zip(*plans) for p in wave]  # each client's i-th request, then i+1
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return {
        "offline_duration_s": elapsed,
        "offline_requests_per_s": len(outs) / elapsed,
        "offline_output_tokens_per_s": sum(len(o.token_ids) for o in outs) / elapsed,
    }


def summarize(args: argparse.Namespace, results: list[Result], unfinished: int, elapsed: float):
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    out_tokens = sum(r.output_tokens for r in ok)

    def pct(xs: list[float], q: float, scale: float = 1.0) -> float | None:
        return float(np.percentile(xs, q)) * scale if xs else None

    return {
        "clients": args.clients,
        "requests": args.clients * args.requests,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "unfinished_at_time_limit": unfinished,
        "prompt_tokens": f"{args.min_prompt_tokens}-{args.max_prompt_tokens}",
        "prompt_tokens_total": sum(r.prompt_tokens for r in ok),
        "max_tokens": args.max_tokens,
        "output_tokens_total": out_tokens,
        "duration_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50, 1e3),
        "itl_p99_ms": pct(gaps, 99, 1e3),
    }


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "longctx.entrypoints.cli", "serve", "--port", "0"]
    if args.model:
        cmd += ["--model", args.model]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    cmd += args.server_args
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"serving .* on (http://\S+)", log.read_text())
        if found and _healthy(found.group(1)):
            return proc, found.group(1)
        time.sleep(0.5)
    stop_server(proc)
    sys.exit(f"the server did not come up:\n{log.read_text()}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--model", default=None, help="model for the started server")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--min-prompt-tokens", type=int, default=50)
    ap.add_argument("--max-prompt-tokens", type=int, default=800)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds for the whole load")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds to start the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--offline-baseline",
        action="store_true",
        help="also run the same prompts through LLM.generate in this process (no HTTP)",
    )
    ap.add_argument("--name", default="serve_load_cpu", help="results file name")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "server_args", nargs="*", help="after --: flags for the started server (engine flags)"
    )
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    load_before = os.getloadavg()[0]
    plans = make_plans(args)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            proc, url = start_server(args, Path(tmp) / "server.log")
        try:
            results, unfinished, elapsed = asyncio.run(run_load(args, url, plans))
        finally:
            if proc is not None:
                stop_server(proc)
    row = summarize(args, results, unfinished, elapsed)
    if args.offline_baseline:
        row.update(offline_baseline(args, plans))
    for r in results:
        if not r.ok:
            print(f"failed: {r.error}", file=sys.stderr)
    notes = (
        f"Server: {url if args.url else 'started by the script'}, flags "
        f"{' '.join(args.server_args) or '(defaults)'}; model {args.model or 'default'}. "
        "Streaming completions, temperature 0, ignore_eos. TTFT and ITL are measured by the "
        "clients (ITL: gaps between streamed chunks, one token each unless a client fell behind). "
        f"1-minute load average of the machine before / after: {load_before:.1f} / "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (server, clients and anything else)."
    )
    if args.offline_baseline:
        notes += (
            " offline_*: the same prompts through LLM.generate in the benchmark process once the "
            "server stopped, at most `clients` requests running at once (no HTTP)."
        )
    write_results(out_dir(args.out), args.name, environment(), [row], notes)
    return 1 if row["failed"] or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
