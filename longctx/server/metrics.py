"""Server metrics in the Prometheus text exposition format (version 0.0.4).

The engine thread records events (first token, each later token, a finished request) under a
lock; a scrape renders them together with a snapshot of the engine's state (queue lengths, KV
blocks, prefill progress) that the engine thread publishes after every step. Written by hand
rather than with prometheus_client: a dozen series need no dependency and no global registry.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from longctx.engine.prefix_cache import PrefixCacheStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "longctx"
FINISH_REASONS = ("stop", "length", "abort", "error")

# Long prompts prefill for minutes, so TTFT buckets reach 10 minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step; prefill maps a request id to (computed, prompt) tokens
    for requests still prefilling (waiting ones included, at 0 computed)."""

    waiting: int = 0
    running: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    prefill: dict[str, tuple[int, int]] = field(default_factory=dict)
    queued_prompt_tokens: int = 0  # of requests accepted but not yet in the engine
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    preemptions: int = 0  # since start


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str) -> Iterable[str]:
        cumulative = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            cumulative += count
            yield f'{name}_bucket{{le="{_le(bound)}"}} {cumulative}'
        yield f"{name}_sum {_num(self.sum)}"
        yield f"{name}_count {cumulative}"


class ServerMetrics:
    """Counters and latency histograms; safe to record from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def later_tokens(self, seconds_each: float, n: int) -> None:
        with self._lock:
            for _ in range(n):
                self.itl.observe(seconds_each)

    def request_done(self, reason: str, prompt_tokens: int, generated: int, seconds: float) -> None:
        """Any end of a request. Generated tokens count whatever the end; prompt tokens and
        end-to-end latency only for completed requests (stop, length)."""
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.generation_tokens += generated
            if reason in ("stop", "length"):
                self.prompt_tokens += prompt_tokens
                self.e2e.observe(seconds)

    def render(self, stats: EngineStats) -> str:
        with self._lock:
            lines = [*_engine_lines(stats), *self._counter_lines(), *self._histogram_lines()]
        return "\n".join(lines) + "\n"

    def _counter_lines(self) -> list[str]:
        lines = _family("requests_finished_total", "counter", "requests by finish reason")
        lines += [
            f'{PREFIX}_requests_finished_total{{finish_reason="{r}"}} {n}'
            for r, n in self.finished.items()
        ]
        lines += _family("prompt_tokens_total", "counter", "prompt tokens of completed requests")
        lines.append(f"{PREFIX}_prompt_tokens_total {self.prompt_tokens}")
        lines += _family("generation_tokens_total", "counter", "tokens generated")
        lines.append(f"{PREFIX}_generation_tokens_total {self.generation_tokens}")
        return lines

    def _histogram_lines(self) -> list[str]:
        lines = []
        for name, hist, help_ in (
            ("time_to_first_token_seconds", self.ttft, "arrival to first generated token"),
            ("inter_token_latency_seconds", self.itl, "time between generated tokens"),
            ("e2e_request_latency_seconds", self.e2e, "arrival to end of completed requests"),
        ):
            lines += _family(name, "histogram", help_)
            lines += hist.samples(f"{PREFIX}_{name}")
        return lines


def _engine_lines(stats: EngineStats) -> list[str]:
    remaining = stats.queued_prompt_tokens
    remaining += sum(prompt - done for done, prompt in stats.prefill.values())
    gauges = (
        ("num_requests_waiting", "requests queued, not yet admitted", stats.waiting),
        ("num_requests_running", "requests admitted (prefilling or decoding)", stats.running),
        ("kv_cache_blocks_used", "KV-cache blocks held by requests", stats.blocks_used),
        ("kv_cache_blocks_total", "KV-cache blocks in all", stats.blocks_total),
        ("prefill_tokens_remaining", "prompt tokens not yet prefilled", remaining),
    )
    lines = []
    for name, help_, value in gauges:
        lines += _family(name, "gauge", help_)
        lines.append(f"{PREFIX}_{name} {value}")
    lines += _prefix_cache_lines(stats.prefix_cache)
    lines += _family("num_preemptions_total", "counter", "requests preempted to free KV blocks")
    lines.append(f"{PREFIX}_num_preemptions_total {stats.preemptions}")
    lines += _family(
        "prefill_progress_ratio", "gauge", "computed / prompt tokens of each prefilling request"
    )
    for rid, (done, prompt) in stats.prefill.items():
        ratio = done / prompt if prompt else 1.0
        lines.append(f'{PREFIX}_prefill_progress_ratio{{request_id="{_label(rid)}"}} {ratio:.6g}')
    return lines


def _prefix_cache_lines(pc: PrefixCacheStats) -> list[str]:
    series = (
        (
            "prefix_cache_queried_tokens_total",
            "counter",
            "tokens of admitted requests looked up in the prefix cache",
            pc.queried_tokens,
        ),
        (
            "prefix_cache_hit_tokens_total",
            "counter",
            "of those, tokens whose KV was cached",
            pc.hit_tokens,
        ),
        (
            "prefix_cache_hit_rate",
            "gauge",
            "hit tokens / queried tokens since start",
            f"{pc.hit_rate:.6g}",
        ),
        (
            "kv_cache_blocks_cached",
            "gauge",
            "KV blocks named in the prefix cache (held or not)",
            pc.cached_blocks,
        ),
    )
    lines = []
    for name, kind, help_, value in series:
        lines += _family(name, kind, help_)
        lines.append(f"{PREFIX}_{name} {value}")
    return lines


def _family(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} {kind}"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else _num(bound)


def _num(value: float) -> str:
    return repr(float(value))
