"""Structured output: the bitmask against a plain loop, grammar checks that name what the
engine cannot enforce, and a tiny random model with the default model's real tokenizer whose
constrained output parses and validates every time (a random model follows no format by
itself, so only the mask can make it valid), synchronously and with asynchronous scheduling."""

import json
import time

import jsonschema
import pytest
import torch

from longctx import LLM, SamplingParams
from longctx.structured_output import (
    GrammarCompiler,
    StructuredOutput,
    StructuredOutputError,
    TokenMasks,
    apply_token_bitmask_,
)
from tests.conftest import device_under_test
from tests.hf_reference import random_checkpoint_with_real_tokenizer

N = 3  # constrained sequences per batch
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "eel"]},
        "ok": {"type": "boolean"},
        "tag": {"type": "string", "maxLength": 3},
        "scores": {"type": "array", "items": {"type": "number", "maximum": 9}, "maxItems": 2},
    },
    "required": ["id", "kind", "ok", "tag", "scores"],
    "additionalProperties": False,
}


def test_bitmask_matches_a_plain_loop():
    torch.manual_seed(0)
    vocab = 70  # not a multiple of 32
    allowed = torch.rand(3, vocab) < 0.3
    words = torch.zeros(3, 3, dtype=torch.int64)
    for r in range(3):
        for t in allowed[r].nonzero()[:, 0].tolist():
            words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    logits = torch.randn(3, vocab)
    expected = torch.where(allowed, logits, torch.tensor(float("-inf")))
    apply_token_bitmask_(logits, bitmask)
    assert torch.equal(logits, expected)


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint_with_real_tokenizer()


@pytest.fixture(scope="module")
def compiler(checkpoint):
    return GrammarCompiler(checkpoint.tokenizer, checkpoint.config.vocab_size)


@pytest.mark.parametrize(
    "schema,named",
    [
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "wizard"}, "wizard"),
    ],
)
def test_unsupported_schema_features_are_named(compiler, schema, named):
    with pytest.raises(StructuredOutputError, match=named):
        compiler.check(StructuredOutput(json_schema=schema))


def test_exactly_one_constraint():
    with pytest.raises(StructuredOutputError):
        StructuredOutput()
    with pytest.raises(StructuredOutputError):
        StructuredOutput(json_schema={}, json_object=True)


@pytest.fixture(scope="module")
def random_llm(checkpoint):
    return lambda async_scheduling: LLM(
        checkpoint=checkpoint,
        device=str(device_under_test()),  # on CUDA: CUDA-graph decode, async by default
        dtype="float32",
        kv_cache_gib=0.02,
        block_size=16,
        max_model_len=512,
        async_scheduling=async_scheduling,
    )


@pytest.mark.parametrize("async_scheduling,compact", [(False, True), (True, False)])
def test_a_random_model_writes_valid_json_under_the_mask(random_llm, async_scheduling, compact):
    llm = random_llm(async_scheduling)
    spec = StructuredOutput(json_schema=SCHEMA, compact=compact)
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_output=spec)
        for s in range(N)
    ]
    plain = SamplingParams(temperature=1.0, seed=0, max_tokens=20)
    outs = llm.generate([[1, 2, 3]] * N + [[4, 5]], params + [plain])
    for out in outs[:N]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
        tight = json.dumps(json.loads(out.text), separators=(",", ":"), ensure_ascii=False)
        assert (out.text == tight) == compact
    assert len({o.text for o in outs[:N]}) > 1  # sampled, not one fixed string
    with pytest.raises(ValueError):
        json.loads(outs[N].text)  # the unconstrained neighbour in the batch stays random


def test_json_object_mode(random_llm):
    llm = random_llm(True)
    spec = StructuredOutput(json_object=True)
    params = SamplingParams(temperature=0.0, max_tokens=30, structured_output=spec)
    out = llm.generate([[7, 8, 9]], params)[0]
    # Greedy from a random model may not close the object in 60 tokens, but every prefix
    # is one: the text starts an object.
    assert out.text.lstrip().startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_offline_api_refuses_an_unsupported_schema(random_llm):
    llm = random_llm(False)
    spec = StructuredOutput(json_schema={"type": "array", "contains": {"type": "integer"}})
    with pytest.raises(StructuredOutputError, match="contains"):
        llm.generate([[1], [2]], [SamplingParams(), SamplingParams(structured_output=spec)])
    assert not llm.engine.has_unfinished()


def test_the_mask_fills_while_the_engine_completes_the_step_before(random_llm, monkeypatch):
    """Async scheduling: the worker thread's mask fill runs during the engine's host work on
    the previous step (_complete), not before or after it."""
    llm = random_llm(True)
    engine = llm.engine
    events: list[tuple[str, float, float]] = []

    def slowed(kind: str, fn):
        def wrapper(*args):
            start = time.perf_counter()
            time.sleep(0.05)
            out = fn(*args)
            events.append((kind, start, time.perf_counter()))
            return out

        return wrapper

    monkeypatch.setattr(TokenMasks, "fill", slowed("fill", TokenMasks.fill))
    monkeypatch.setattr(type(engine), "_complete", slowed("complete", type(engine)._complete))
    spec = StructuredOutput(json_object=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, structured_output=spec)
    out = llm.generate([[7, 8, 9]], params)[0]
    assert out.text.lstrip().startswith("{")
    fills = [(a, b) for kind, a, b in events if kind == "fill"]
    completes = [(a, b) for kind, a, b in events if kind == "complete"]
    overlapping = sum(any(a < d and c < b for c, d in completes) for a, b in fills)
    assert overlapping >= len(fills) - 2, events  # all but the first and last steps' fills
