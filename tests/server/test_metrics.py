"""The Prometheus exposition parses and says what happened."""

import pytest

from longctx.server.metrics import EngineStats, ServerMetrics

parser = pytest.importorskip("prometheus_client.parser")


def families(text: str) -> dict:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, name, labels))


def test_exposition_parses_and_counts():
    m = ServerMetrics()
    m.first_token(0.2)
    m.later_tokens(0.03, 2)
    m.request_done("length", prompt_tokens=10, generated=3, seconds=0.5)
    m.request_done("abort", prompt_tokens=4, generated=0, seconds=0.1)
    stats = EngineStats(
        waiting=1, running=2, blocks_used=5, blocks_total=64, prefill={"r1": (30, 120)}
    )
    fams = families(m.render(stats))
    assert sample(fams, "longctx_num_requests_waiting", "longctx_num_requests_waiting") == 1
    assert sample(fams, "longctx_num_requests_running", "longctx_num_requests_running") == 2
    assert sample(fams, "longctx_kv_cache_blocks_used", "longctx_kv_cache_blocks_used") == 5
    assert sample(fams, "longctx_kv_cache_blocks_total", "longctx_kv_cache_blocks_total") == 64
    assert (
        sample(fams, "longctx_prefill_tokens_remaining", "longctx_prefill_tokens_remaining") == 90
    )
    ratio = sample(
        fams, "longctx_prefill_progress_ratio", "longctx_prefill_progress_ratio", request_id="r1"
    )
    assert ratio == pytest.approx(0.25)
    fin = "longctx_requests_finished"
    assert sample(fams, fin, f"{fin}_total", finish_reason="length") == 1
    assert sample(fams, fin, f"{fin}_total", finish_reason="abort") == 1
    assert sample(fams, fin, f"{fin}_total", finish_reason="stop") == 0
    assert sample(fams, "longctx_generation_tokens", "longctx_generation_tokens_total") == 3
    ttft = "longctx_time_to_first_token_seconds"
    assert sample(fams, ttft, f"{ttft}_count") == 1
    assert sample(fams, ttft, f"{ttft}_bucket", le="0.25") == 1
    assert sample(fams, ttft, f"{ttft}_bucket", le="0.1") == 0
    itl = "longctx_inter_token_latency_seconds"
    assert sample(fams, itl, f"{itl}_count") == 2
    assert sample(fams, itl, f"{itl}_sum") == pytest.approx(0.06)
    assert sample(fams, itl, f"{itl}_bucket", le="+Inf") == 2


def test_label_values_are_escaped():
    text = ServerMetrics().render(EngineStats(prefill={'a"b\\c\nd': (0, 1)}))
    fams = families(text)
    ratio = fams["longctx_prefill_progress_ratio"].samples[0]
    assert ratio.labels["request_id"] == 'a"b\\c\nd'
