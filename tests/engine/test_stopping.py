"""Stop conditions and streaming on the real default model (shared, loaded once)."""

import pytest

from longctx import LLM, SamplingParams
from longctx.loading import default_model_path

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"


@pytest.fixture(scope="module")
def llm():
    return LLM(model=default_model_path(fetch=True), device="cpu")


def greedy(**kw):
    return SamplingParams(temperature=0, **kw)


def test_stop_string_is_cut_and_ends_generation(llm):
    free = llm.generate(PROMPT, greedy(max_tokens=24))[0]
    assert "return" in free.text
    out = llm.generate(PROMPT, greedy(max_tokens=24, stop="return"))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index("return")]
    assert len(out.token_ids) < len(free.token_ids)


def test_stop_token_ids_and_max_tokens(llm):
    free = llm.generate(PROMPT, greedy(max_tokens=10))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    third = free.token_ids[2]
    out = llm.generate(PROMPT, greedy(max_tokens=10, stop_token_ids=(third,)))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(third) + 1]
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignored(llm):
    chat = [{"role": "user", "content": "Say OK and nothing else."}]
    out = llm.chat(chat, greedy(max_tokens=40))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.tokenizer.eos_token_ids
    longer = llm.chat(chat, greedy(max_tokens=len(out.token_ids) + 5, ignore_eos=True))[0]
    assert longer.finish_reason == "length"
    assert longer.token_ids[: len(out.token_ids)] == out.token_ids


def test_streamed_pieces_add_up_to_the_text(llm):
    pieces = []
    params = greedy(max_tokens=20, stop="sub(")

    def collect(o):
        pieces.append(o.new_text)

    out = llm.generate("def add(a, b):\n    return a + b\n\n", params, on_output=collect)[0]
    assert "".join(pieces) == out.text
    assert "sub(" not in "".join(pieces)


def test_seed_reproduces_sampling(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12)
    a = llm.generate(PROMPT, params)[0].token_ids
    b = llm.generate([PROMPT, "Hello"], [params, SamplingParams(seed=5, max_tokens=3)])[0].token_ids
    assert a == b
