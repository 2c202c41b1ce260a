"""Structured output, penalties and n > 1 on CUDA with CUDA-graph decode and asynchronous
scheduling (the defaults there): the grammar mask is applied to the graph's logits, the host
fills it while the next forward runs; outputs validate and equal the eager engine's."""

import json

import jsonschema
import pytest

from longctx import LLM, SamplingParams
from longctx.structured_output import StructuredOutput
from tests.hf_reference import random_checkpoint_with_real_tokenizer
from tests.test_structured_output import SCHEMA


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint_with_real_tokenizer()


def run(checkpoint, eager, params, n_prompts=4):
    llm = LLM(
        checkpoint=checkpoint,
        device="cuda",
        dtype="float32",
        block_size=16,
        kv_cache_gib=0.1,
        max_model_len=512,
        max_num_seqs=8,
        attention_backend="triton",
        enforce_eager=eager,
    )
    assert llm.engine.async_scheduling and (llm.engine.runner.graphs is None) == eager
    return llm.generate([[1, 2, 3 + i] for i in range(n_prompts)], params)


def test_constrained_graph_decode_validates_and_equals_eager(checkpoint):
    spec = StructuredOutput(json_schema=SCHEMA, compact=True)
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=200, structured_output=spec, presence_penalty=0.5
    )
    graph, eager = run(checkpoint, False, params), run(checkpoint, True, params)
    for g, e in zip(graph, eager):
        assert g.finish_reason == "stop"
        jsonschema.validate(json.loads(g.text), SCHEMA)
        assert g.token_ids == e.token_ids


def test_n_samples_share_the_prompt_on_cuda(checkpoint):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=4)
    outs = run(checkpoint, False, params, n_prompts=1)
    single = run(checkpoint, False, SamplingParams(**{**params.__dict__, "n": 1}), n_prompts=1)
    assert [o.token_ids for o in outs] == [single[0].token_ids] * 4
