"""Pipeline parallelism on the CPU (gloo): 2 and 3 stage processes give the tokens and
logprobs of one process on a tiny 4-layer model, with DCA, chunked prefill (fixed and DCPP
chunks), sparse prefill, an fp8 cache and asynchronous scheduling.

Each engine spawns its workers once per module (start-up dominates the run time)."""

from __future__ import annotations

import pytest

from longctx import LLM, SamplingParams
from longctx.config import DCAConfig
from longctx.distributed.engine import PipelineEngine
from longctx.engine.dcpp import DCPPChunks, FixedChunks
from longctx.sparse.config import HeadPattern, SparseConfig
from tests.engine.test_dca_engine import random_prompts

DCA = DCAConfig(chunk_size=32, local_size=8, original_max_position_embeddings=32)  # c = 24
# Budgets differ by layer, so that a stage reading another layer's budget would show.
SPARSE = SparseConfig(
    layers=tuple((HeadPattern(2 + 3 * layer, 8 + 8 * layer),) * 4 for layer in range(4)),
    threshold=40,
    last_q=8,
)
TOL = 1e-4
PARAMS = SamplingParams(
    max_tokens=12, temperature=0, logprobs=2, prompt_logprobs=1, ignore_eos=True
)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("block_size", 8)
    kw.setdefault("kv_cache_gib", 0.02)
    kw.setdefault("max_num_batched_tokens", 32)
    return LLM(path, dtype="float32", device="cpu", dca=DCA, **kw)


@pytest.fixture(scope="module")
def pp2(tiny_model_dir):
    """DCA + sparse prefill with fixed chunks (sparse estimation depends on where chunks end)."""
    llm = make_llm(
        tiny_model_dir, sparse=SPARSE, pipeline_parallel_size=2, pipeline_chunking="fixed"
    )
    yield llm
    llm.engine.close()


@pytest.fixture(scope="module")
def pp3(tiny_model_dir):
    """DCA + fp8 cache with DCPP chunks."""
    llm = make_llm(tiny_model_dir, kv_cache_dtype="fp8", pipeline_parallel_size=3)
    yield llm
    llm.engine.close()


def assert_same(got, want, tol=TOL):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert max(abs(x[t] - y[t]) for t in y) < tol
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert max(abs(x[t] - y[t]) for t in y) < tol


def test_layers_are_split_over_the_stages(pp2, pp3):
    assert isinstance(pp2.engine, PipelineEngine)
    assert [list(r) for r in pp2.engine.runner.spec.layers] == [[0, 1], [2, 3]]
    assert [len(r) for r in pp3.engine.runner.spec.layers] == [1, 1, 2]  # stage 0: LM head too
    assert isinstance(pp2.engine.scheduler.chunks, FixedChunks)
    assert isinstance(pp3.engine.scheduler.chunks, DCPPChunks)


def test_two_stages_sparse_dca_match_one_process(tiny_model_dir, pp2):
    one = make_llm(tiny_model_dir, sparse=SPARSE)
    prompts = random_prompts([30, 150], seed=1)
    # One prompt per call: in a shared step the chunk boundaries (hence the sparse selection)
    # would depend on how the token budget was split between prompts.
    got = [pp2.generate([ids], PARAMS)[0] for ids in prompts]
    for ids, out in zip(prompts, got):
        assert_same([out], one.generate([ids], PARAMS))
    ids, sparse_lps = prompts[1], got[1].prompt_logprobs
    dense_lps = make_llm(tiny_model_dir).generate([ids], PARAMS)[0].prompt_logprobs
    far = [abs(sparse_lps[p][ids[p]] - dense_lps[p][ids[p]]) for p in range(50, 150)]
    assert max(far) > 1e-3  # the budgets are small enough for sparse prefill to matter


def test_three_stages_fp8_dcpp_batch_matches_one_process(tiny_model_dir, pp3):
    prompts = random_prompts([5, 100, 37, 150, 60], seed=2)
    want = make_llm(tiny_model_dir, kv_cache_dtype="fp8").generate(prompts, PARAMS)
    # Different chunk and micro-batch boundaries move float32 rounding, which an fp8 cache
    # can turn into a different e4m3 value of a later layer's key.
    assert_same(pp3.generate(prompts, PARAMS), want, tol=2e-3)


def test_prefill_chunks_overlap_in_the_pipeline(pp3):
    engine = pp3.engine
    ids = random_prompts([150], seed=3)[0]
    assert len(engine.scheduler.chunks.boundaries(150)) >= 5
    engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
    engine.step()
    # While the first chunk came back, the next two were already in stages 0 and 1.
    assert engine.micro_batches_in_flight == 2
    while engine.has_unfinished():
        engine.step()


def test_decode_spreads_sequences_over_micro_batches(pp3):
    engine = pp3.engine
    for ids in random_prompts([4, 5, 6, 7, 8, 9], seed=4):
        engine.add_request(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    counts = []
    while engine.has_unfinished():
        engine.step()
        counts.append(engine.micro_batches_in_flight)
    assert max(counts) == 2  # three micro-batches of two sequences, one being completed


def test_async_scheduling_gives_the_same_tokens(tiny_model_dir, pp3):
    prompts = random_prompts([9, 70, 33], seed=5)
    sync = pp3.generate(prompts, PARAMS)
    pp3.engine.async_scheduling = True
    try:
        assert_same(pp3.generate(prompts, PARAMS), sync, tol=2e-3)
    finally:
        pp3.engine.async_scheduling = False


def test_seeded_sampling_matches_one_process(tiny_model_dir, pp2):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    ids = random_prompts([20], seed=6)[0]
    one = make_llm(tiny_model_dir, sparse=SPARSE)
    assert pp2.generate([ids], params)[0].token_ids == one.generate([ids], params)[0].token_ids


def test_busy_times_cover_every_stage(pp3):
    pp3.engine.busy_times()
    pp3.generate(random_prompts([120], seed=7), SamplingParams(max_tokens=1))
    times = pp3.engine.busy_times()
    assert [t.rank for t in times] == [0, 1, 2]
    assert all(t.seconds > 0 and t.micro_batches >= 5 for t in times)


def test_server_over_a_pipeline_answers_like_the_offline_api(pp3):
    from fastapi.testclient import TestClient

    from longctx.server.app import ServerConfig, create_app
    from longctx.server.engine_loop import EngineLoop

    ids = random_prompts([40], seed=8)[0]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    offline = pp3.generate([ids], greedy)[0]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(EngineLoop(pp3.engine), ServerConfig("tiny"))) as client:
        resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == offline.text
    assert resp.json()["usage"]["completion_tokens"] == 5


def test_cli_generate_with_three_stages(tiny_model_dir, pp3, capsys):
    from longctx.entrypoints.cli import main

    prompt = "def add(a, b):"
    flags = ["--device", "cpu", "--dtype", "float32", "--block-size", "8", "--kv-cache-gib"]
    flags += ["0.02", "--max-num-batched-tokens", "8", "--max-tokens", "8", "--ignore-eos"]
    flags += ["--dca-chunk-size", "32", "--dca-local-size", "8", "--no-progress"]
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            prompt,
            *flags,
            "--pipeline-parallel-size",
            "3",
            "--kv-cache-dtype",
            "fp8",
        ]
    )
    assert code == 0
    want = pp3.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert capsys.readouterr().out == want[0].text + "\n"


def test_penalties_logit_bias_and_grammars_match_one_process(tiny_model_dir, pp3):
    from longctx.structured_output import StructuredOutput

    prompts = random_prompts([12, 45], seed=9)
    shaped = SamplingParams(
        max_tokens=8,
        temperature=0,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        logit_bias={17: 4.0, 99: -100.0},
    )
    grammar = SamplingParams(
        max_tokens=6, temperature=0, structured_output=StructuredOutput(lark="start: /[ab]+/")
    )
    one = make_llm(tiny_model_dir, kv_cache_dtype="fp8")
    for params in (shaped, grammar):
        got, want = pp3.generate(prompts, params), one.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(set(o.text) <= {"a", "b"} and o.text for o in got)
