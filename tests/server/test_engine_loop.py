"""The engine thread behind the server, driven from asyncio with a tiny random model."""

import asyncio

import pytest

from longctx import LLM, SamplingParams
from longctx.errors import PromptTooLongError
from longctx.server.engine_loop import (
    EngineLoop,
    EngineRequest,
    EngineStepError,
    EngineStopped,
)
from tests.hf_reference import checkpoint_of, tiny_hf_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 2, 3], list(range(10, 50)), [7] * 17, list(range(100, 105))]


@pytest.fixture(scope="module")
def llm():
    return LLM(
        checkpoint=checkpoint_of(tiny_hf_model(seed=3)),
        device="cpu",
        dtype="float32",
        kv_cache_gib=0.01,
        block_size=16,
        max_model_len=256,
    )


@pytest.fixture(scope="module")
def expected(llm):
    """Offline outputs, computed before any engine thread runs (the engine is not thread-safe)."""
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture
def loop(llm):
    engine_loop = EngineLoop(llm.engine)
    engine_loop.start()
    yield engine_loop
    engine_loop.shutdown()


def request(rid, ids, params=GREEDY):
    return EngineRequest(request_id=rid, prompt=None, prompt_token_ids=list(ids), params=params)


async def run_one(loop, rid, ids, params=GREEDY):
    async with loop.open([request(rid, ids, params)]) as stream:
        return (await stream.final_outputs())[rid]


async def wait_idle(loop, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        stats = loop.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.blocks_used == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine still busy: {loop.stats()}")


def test_concurrent_requests_match_offline_generate(expected, loop):

    async def main():
        runs = [run_one(loop, f"r{i}", p) for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(*runs)

    outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    assert loop.metrics.finished["length"] >= len(PROMPTS)


def test_one_stream_carries_several_requests(loop):
    async def main():
        reqs = [request("a", PROMPTS[0]), request("b", PROMPTS[1])]
        async with loop.open(reqs) as stream:
            return await stream.final_outputs()

    finals = asyncio.run(main())
    assert sorted(finals) == ["a", "b"] and all(o.finished for o in finals.values())


def test_closing_the_stream_aborts_and_frees_blocks(loop):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        async with loop.open([request("long", PROMPTS[1], long)]) as stream:
            async for out in stream:
                if len(out.token_ids) >= 2:
                    break
        return await wait_idle(loop)

    before = loop.metrics.finished["abort"]
    asyncio.run(main())
    assert loop.metrics.finished["abort"] == before + 1


def test_a_bad_request_fails_alone(loop):
    async def main():
        good = asyncio.ensure_future(run_one(loop, "good", PROMPTS[0]))
        with pytest.raises(PromptTooLongError):
            await run_one(loop, "bad", list(range(300)))  # add_request refuses it
        return await good

    assert asyncio.run(main()).finished


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(llm, loop, monkeypatch):
    real_step = llm.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(llm.engine, "step", flaky_step)

    async def main():
        with pytest.raises(EngineStepError):
            await run_one(loop, "victim", PROMPTS[1])
        await wait_idle(loop)
        return await run_one(loop, "after", PROMPTS[0])

    assert asyncio.run(main()).finished
    assert loop.is_alive()


def test_shutdown_fails_what_is_left_and_refuses_new_requests(llm):
    engine_loop = EngineLoop(llm.engine)
    engine_loop.start()
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        async with engine_loop.open([request("cut", PROMPTS[1], long)]) as stream:
            async for _ in stream:
                await asyncio.to_thread(engine_loop.shutdown)
        # unreachable: the stream raises EngineStopped

    with pytest.raises(EngineStopped):
        asyncio.run(main())

    async def late():
        engine_loop.open([request("late", PROMPTS[0])])

    with pytest.raises(EngineStopped):
        asyncio.run(late())
    assert not llm.engine.has_unfinished()
