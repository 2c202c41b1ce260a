"""The tokenizer rebuilt from the default model's GGUF against transformers' (same file)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from longctx.loading import load_checkpoint
from longctx.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

TEXTS = [
    "",
    "Hello, world!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "The year 2024 had 366 days; π ≈ 3.14159, 1e-9, 0x1F, 1,234,567.89",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 텍스트",
    "Emojis: 🎉🚀👩‍👩‍👧‍👦 🇫🇷 ❤️ 🤖",
    "   leading spaces and trailing   \t\t tabs\n\n\n\nnewlines\r\n crlf  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>{"name": "f"}</tool_call><|endoftext|><|fim_prefix|>x<|fim_suffix|>',
    "I'm sure they've said it's OK, WE'LL see; don't!",
    "Ünïcödé façade naïve café — “quotes” ‘single’ … « guillemets »",
    "a" * 300 + " " + "ab" * 50,
    "x = [1, 2, 3]\ny = {'a': 1}\nprint(x[0]  +  y['a'])\n",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "Mixed: Привет мир! مرحبا بالعالم שלום עולם नमस्ते दुनिया",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about Python."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain <|im_end|> tokens. 你好 🎉"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <html> & such",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def ours(default_gguf: Path) -> Tokenizer:
    tokenizer = load_checkpoint(default_gguf).tokenizer
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def theirs(default_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name
    )


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, theirs, text):
    # transformers' GGUF tokenizer skips Qwen2's NFC normalizer; NFC text is the same either way
    assert unicodedata.is_normalized("NFC", text)
    expected = theirs.encode(text, add_special_tokens=False)
    assert ours.encode(text) == expected
    assert ours.encode(text, add_special_tokens=True) == theirs.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(ours, theirs, text):
    ids = ours.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_nfc_normalizes_like_qwen2_tokenizer_json(ours):
    decomposed = unicodedata.normalize("NFD", "café naïve Ünïcödé")
    assert ours.encode(decomposed) == ours.encode(unicodedata.normalize("NFC", decomposed))


def test_special_ids_and_vocab(ours, theirs):
    assert ours.vocab_size == len(theirs) == 151936
    assert ours.eos_token_ids == (151645, 151643)  # <|im_end|>, <|endoftext|>
    assert ours.bos_token_id == 151643
    assert ours.encode("<|im_start|>") == [151644]
    assert ours.encode("<tool_call>") == [151657]  # user-defined: whole, not special
    assert ours.decode([151657, 151644]) == "<tool_call>"  # skip drops only special ones


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, theirs, messages, add_generation_prompt):
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def test_chat_template_with_tools_matches_transformers(ours, theirs):
    messages = CONVERSATIONS[0]
    expected = theirs.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(messages, tools=TOOLS) == expected
    assert "<html> & such" in expected  # tojson must not HTML-escape


def test_hf_dir_tokenizer_saved_by_transformers(tmp_path, ours, theirs):
    """The same tokenizer via tokenizer.json + tokenizer_config.json (+ chat_template.jinja)."""
    theirs.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    assert from_dir.chat_template == ours.chat_template
    assert from_dir.eos_token_ids[0] == 151645
    for text in TEXTS:
        assert from_dir.encode(text) == ours.encode(text)
    messages = CONVERSATIONS[1]
    assert from_dir.apply_chat_template(messages) == ours.apply_chat_template(messages)


def test_incremental_detokenizer_on_real_tokens(ours):
    text = "".join(TEXTS[2:8])
    ids = ours.encode(text)
    detok = ours.detokenizer(skip_special_tokens=False)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == detok.text == text
    # emoji bytes span several tokens, so some steps complete nothing
    assert pieces.count("") > 0
