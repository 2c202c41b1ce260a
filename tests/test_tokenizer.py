"""Tokenizer unit tests on small hand-built vocabularies (no model files needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers.pre_tokenizers import ByteLevel

from longctx.errors import ConfigError, LongctxError, ModelLoadError
from longctx.tokenizer import IncrementalDetokenizer, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_metadata(**overrides: Any) -> dict[str, Any]:
    """GGUF-style metadata: the 256 byte symbols, a few merges, control + user tokens."""
    alphabet = sorted(ByteLevel.alphabet())
    merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    tokens = alphabet + merged + SPECIALS + ["<tool_call>"]
    types = [1] * (len(alphabet) + len(merged)) + [3] * len(SPECIALS) + [4]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"],
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.chat_template": QWEN_LIKE_TEMPLATE,
    }
    metadata.update(overrides)
    return metadata


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(byte_level_metadata(), source="test.gguf")


def test_encode_decode_roundtrip(tok):
    text = "hello world 你好 🎉\n\n  tabs\tand ünïcödé"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == tok.token_to_id("hello")  # merges apply
    assert tok.id_to_token(ids[1]) == "Ġwo"


def test_special_tokens_stay_whole(tok):
    ids = tok.encode("<|im_start|>hello<|im_end|><tool_call>")
    assert ids == [
        tok.token_to_id(t) for t in ("<|im_start|>", "hello", "<|im_end|>", "<tool_call>")
    ]
    assert tok.decode(ids) == "hello<tool_call>"  # control tokens skipped, user-defined kept
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|><tool_call>"


def test_properties(tok):
    assert tok.vocab_size == 256 + 6 + 3 + 1
    # eos first, then other end-of-generation control tokens (as llama.cpp does)
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    assert tok.bos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.chat_template == QWEN_LIKE_TEMPLATE
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")  # no BOS for Qwen


def test_add_bos_token_prepends_bos():
    metadata = byte_level_metadata(**{"tokenizer.ggml.add_bos_token": True})
    tok = Tokenizer.from_gguf_metadata(metadata)
    hello = tok.token_to_id("hello")
    assert tok.encode("hello", add_special_tokens=True) == [tok.bos_token_id, hello]
    assert tok.encode("hello") == [tok.token_to_id("hello")]


def test_llama3_and_gpt2_pre_tokenizers_build():
    for pre in ("llama-bpe", "gpt2"):
        tok = Tokenizer.from_gguf_metadata(byte_level_metadata(**{"tokenizer.ggml.pre": pre}))
        assert tok.decode(tok.encode("hello world 123")) == "hello world 123"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
        ({"tokenizer.ggml.pre": "mystery"}, "pre-tokenizer 'mystery' is not supported"),
        ({"tokenizer.ggml.merges": ["q z"]}, "invalid GGUF tokenizer"),
    ],
)
def test_unsupported_gguf_tokenizers_raise(override, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        Tokenizer.from_gguf_metadata(byte_level_metadata(**override), source="x.gguf")
    assert "x.gguf" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"tokenizer.ggml.token_type": [1, 1]}, "but 2 token types"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id 1000000 is outside"),
    ],
)
def test_inconsistent_gguf_vocabularies_raise(override, message):
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_gguf_metadata(byte_level_metadata(**override), source="x.gguf")


def test_missing_merges_raise():
    metadata = byte_level_metadata()
    del metadata["tokenizer.ggml.merges"]
    with pytest.raises(ModelLoadError, match="lacks 'tokenizer.ggml.merges'"):
        Tokenizer.from_gguf_metadata(metadata, source="x.gguf")


# ---- chat templates ---------------------------------------------------------------------------


def test_chat_template_renders(tok):
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def _with_template(template: str | None) -> Tokenizer:
    metadata = byte_level_metadata(**{"tokenizer.chat_template": template})
    return Tokenizer.from_gguf_metadata(metadata)


def test_missing_chat_template_is_a_config_error():
    tok = _with_template(None)
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_raise_exception_and_syntax_errors_are_config_errors():
    tok = _with_template("{{ raise_exception('only user messages') }}")
    with pytest.raises(ConfigError, match="only user messages"):
        tok.apply_chat_template([])
    with pytest.raises(ConfigError, match="not valid Jinja2"):
        _with_template("{% for %}").apply_chat_template([])


def test_template_environment_matches_transformers():
    transformers_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (
        "{%- for m in messages %}\n"
        "  {% if m.role == 'system' %}[{{ m.content | tojson }}]{% continue %}{% endif %}\n"
        "  {{ m.role }}: {{ m.content | trim }}\n"
        "{%- endfor %}\n"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}{{ bos_token }}|{{ eos_token }}"
    )
    messages = [{"role": "system", "content": "<b>&é</b>"}, {"role": "user", "content": " x "}]
    tools = [{"name": "t", "description": "a <tag> & more"}]
    tok = _with_template(template)
    expected = transformers_utils.render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=True,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )[0][0]
    assert tok.apply_chat_template(messages, tools=tools) == expected


def test_sandbox_blocks_attribute_escape():
    tok = _with_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(LongctxError):
        tok.apply_chat_template([])


# ---- incremental detokenization ---------------------------------------------------------------


def test_incremental_detokenizer_holds_back_partial_characters(tok):
    text = "hello wé 你好🎉 <|im_end|> done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == tok.decode(ids)
    # '你' is three byte tokens: the first two complete nothing, the third the whole character
    first = ids.index(tok.encode("你")[0])
    assert pieces[first : first + 3] == ["", "", "你"]


def test_incremental_detokenizer_keeps_specials_when_asked(tok):
    detok = tok.detokenizer(skip_special_tokens=False)
    out = [detok.add(i) for i in tok.encode("hello<|im_end|>")]
    assert out == ["hello", "<|im_end|>"]
    assert detok.token_ids == tok.encode("hello<|im_end|>")


def test_flush_emits_incomplete_tail(tok):
    detok = tok.detokenizer()
    partial = tok.encode("🎉")[:2]
    assert [detok.add(i) for i in partial] == ["", ""]
    assert detok.flush() == "\ufffd" * len(tok.decode(partial))
    assert detok.flush() == ""


# ---- Hugging Face directory -------------------------------------------------------------------


def _write_hf_tokenizer(directory: Path, tok: Tokenizer, **config: Any) -> None:
    tok.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_from_hf_dir_reads_config_and_generation_config(tmp_path, tok):
    _write_hf_tokenizer(
        tmp_path,
        tok,
        chat_template=QWEN_LIKE_TEMPLATE,
        eos_token={"content": "<|im_end|>", "special": True},
        bos_token=None,
    )
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
        )
    )
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_token_ids == tok.eos_token_ids
    assert loaded.bos_token_id is None
    assert loaded.chat_template == QWEN_LIKE_TEMPLATE
    assert loaded.encode("hello 你好<|im_start|>") == tok.encode("hello 你好<|im_start|>")


def test_from_hf_dir_prefers_chat_template_jinja_and_named_lists(tmp_path, tok):
    _write_hf_tokenizer(
        tmp_path,
        tok,
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    )
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "J"


def test_from_hf_dir_without_template_or_config(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.chat_template is None and loaded.eos_token_ids == ()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("tokenizer.json", "{not json", "cannot read tokenizer"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object"),
        ("generation_config.json", "{", "cannot read JSON"),
    ],
)
def test_from_hf_dir_bad_files(tmp_path, tok, name, content, message):
    _write_hf_tokenizer(tmp_path, tok)
    (tmp_path / name).write_text(content)
    with pytest.raises(ModelLoadError, match=message) as err:
        Tokenizer.from_hf_dir(tmp_path)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_template_type_errors_are_config_errors(tok):
    with pytest.raises(ConfigError, match="failed on these messages"):
        tok.apply_chat_template([{"role": "user", "content": None}])  # str + None
