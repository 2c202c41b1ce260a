"""A pipeline whose worker dies or hangs fails with a one-line PipelineError, promptly, and
leaves no process behind; settings a pipeline cannot run are refused before any spawn."""

from __future__ import annotations

import os
import signal
import time

import pytest

from longctx import LLM, SamplingParams
from longctx.distributed.comm import PipelineError
from longctx.errors import ConfigError
from tests.hf_reference import checkpoint_of, tiny_hf_model

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def make_llm(path, **kw) -> LLM:
    return LLM(path, dtype="float32", device="cpu", block_size=16, kv_cache_gib=0.01, **kw)


def workers(llm) -> list:
    return llm.engine.runner._procs


def test_killed_worker_stops_the_engine_with_a_clear_error(tiny_model_dir):
    llm = make_llm(tiny_model_dir, pipeline_parallel_size=3, max_num_batched_tokens=16)
    try:
        assert llm.generate([[1, 2, 3]], PARAMS)[0].token_ids
        victim = workers(llm)[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        start = time.monotonic()
        with pytest.raises(PipelineError) as err:
            llm.generate([list(range(1, 60))], PARAMS)
        assert time.monotonic() - start < 10
        message = str(err.value)
        assert "\n" not in message
        assert f"pipeline stage 1 (pid {victim.pid}) was killed by SIGKILL" in message
        assert all(p.exitcode is not None for p in workers(llm))  # stage 2 too
        with pytest.raises(PipelineError, match="stopped earlier"):
            llm.generate([[1, 2, 3]], PARAMS)
    finally:
        llm.engine.close()


def test_hung_worker_times_out(tiny_model_dir):
    llm = make_llm(tiny_model_dir, pipeline_parallel_size=2, pipeline_timeout_s=3)
    try:
        os.kill(workers(llm)[0].pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(PipelineError, match=r"no micro-batch result from the pipeline in 3 s"):
            llm.generate([[1, 2, 3]], PARAMS)
        assert time.monotonic() - start < 15
        assert all(p.exitcode is not None for p in workers(llm))  # killed, though stopped
    finally:
        llm.engine.close()


def test_in_memory_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="needs a checkpoint on disk"):
        LLM(checkpoint=checkpoint_of(tiny_hf_model()), device="cpu", pipeline_parallel_size=2)


def test_more_stages_than_layers_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="every stage needs at least one layer"):
        make_llm(tiny_model_dir, pipeline_parallel_size=5)


def test_worker_failing_at_start_up_names_its_error(tiny_model_dir):
    # 6 KiB: one block of a 1-layer stage (4 KiB) fits, one of the 2-layer last stage does not.
    with pytest.raises(PipelineError) as err:
        LLM(
            tiny_model_dir,
            dtype="float32",
            device="cpu",
            block_size=16,
            kv_cache_gib=6 * 2**10 / 2**30,
            pipeline_parallel_size=3,
        )
    assert "\n" not in str(err.value)
    assert "pipeline stage 2 (pid " in str(err.value)
    assert "failed: OutOfKVMemoryError: pipeline stage 2: KV cache budget" in str(err.value)


def test_saved_kv_is_refused(tiny_model_dir, tmp_path):
    llm = make_llm(tiny_model_dir, pipeline_parallel_size=2)
    try:
        with pytest.raises(ConfigError, match="does not work with pipeline parallelism"):
            llm.save_kv(list(range(1, 40)), tmp_path / "kv")
    finally:
        llm.engine.close()
