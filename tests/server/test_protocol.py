"""OpenAI shapes without a server: request parsing, logprobs objects, chunk sequences."""

import pytest

from longctx.engine.outputs import RequestOutput
from longctx.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
    TokenNames,
    _byte_decoder,
    parse_request,
)


def output(rid="r-0", tokens=(), text="", new_text="", logprobs=None, reason=None):
    return RequestOutput(
        request_id=rid,
        prompt=None,
        prompt_token_ids=[1, 2, 3],
        text=text,
        new_text=new_text,
        token_ids=list(tokens),
        logprobs=logprobs,
        prompt_logprobs=None,
        finished=reason is not None,
        finish_reason=reason,
        num_computed_prompt_tokens=3,
    )


def test_byte_level_alphabet_covers_every_byte_once():
    decoder = _byte_decoder()
    assert sorted(decoder.values()) == list(range(256))
    assert decoder["Ġ"] == 0x20 and decoder["Ċ"] == 0x0A and decoder["a"] == ord("a")


def test_prompt_forms():
    assert parse_request(CompletionRequest, {"prompt": "hi"}).prompts() == ["hi"]
    assert parse_request(CompletionRequest, {"prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse_request(CompletionRequest, {"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert parse_request(CompletionRequest, {"prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]


def test_sampling_fields_map_to_sampling_params():
    req = parse_request(
        CompletionRequest,
        {"prompt": "x", "temperature": 0, "top_k": -1, "stop": "END", "seed": 3, "min_tokens": 2},
    )
    params = req.sampling_params(7, logprobs=1)
    assert params.greedy and params.top_k == 0 and params.stop == ("END",)
    assert (params.seed, params.min_tokens, params.max_tokens, params.logprobs) == (3, 2, 7, 1)


def test_chat_messages_flatten_text_parts_and_developer_role():
    req = parse_request(
        ChatCompletionRequest,
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_completion_tokens": 5,
            "logprobs": True,
        },
    )
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert req.max_output_tokens == 5 and req.engine_logprobs == 0


def test_validation_error_names_the_parameter():
    with pytest.raises(ApiError) as e:
        parse_request(ChatCompletionRequest, {"messages": [{"role": "user"}], "top_p": 2})
    assert e.value.status == 400 and e.value.param == "top_p"


def test_completion_stream_chunks_and_logprob_offsets():
    names = TokenNames(None)
    f = CompletionFormatter("cmpl-1", "m", ["r-0"], names, top_logprobs=1, include_usage=True)
    lp1 = [{5: -0.1, 6: -2.0}]
    lp2 = lp1 + [{7: -0.5, 8: -0.7}]
    assert f.chunks(output()) == []  # a prefill step: nothing to say
    first = f.chunks(output(tokens=[5], text="ab", new_text="ab", logprobs=lp1))
    second = f.chunks(output(tokens=[5, 7], text="abc", new_text="c", logprobs=lp2, reason="stop"))
    c1, c2 = first[0]["choices"][0], second[0]["choices"][0]
    assert (c1["text"], c1["finish_reason"], c2["text"], c2["finish_reason"]) == (
        "ab",
        None,
        "c",
        "stop",
    )
    assert c1["logprobs"]["text_offset"] == [0] and c2["logprobs"]["text_offset"] == [2]
    assert c2["logprobs"]["tokens"] == ["token_id:7"]
    assert c2["logprobs"]["top_logprobs"] == [{"token_id:7": -0.5}]
    (usage,) = f.closing_chunks()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2


def test_chat_stream_opens_with_the_role_and_closes_with_the_reason():
    f = ChatFormatter("chatcmpl-1", "m", ["r-0"], TokenNames(None), top_logprobs=None)
    (opening,) = f.opening_chunks()
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    (last,) = f.chunks(output(tokens=[9], text="hi", new_text="", reason="length"))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last
    whole = f.response({"r-0": output(tokens=[9], text="hi", reason="length")})
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
