"""A tiny random Qwen2 with a real byte-level tokenizer and a ChatML template, written as a
Hugging Face directory: text prompts, chat and `longctx serve --model DIR` in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from longctx.tokenizer import Tokenizer
from tests.hf_reference import tiny_hf_model
from tests.test_tokenizer import QWEN_LIKE_TEMPLATE, byte_level_metadata


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(byte_level_metadata(), source="tiny")


def write_tiny_chat_model(directory: Path, seed: int = 7, **config: int) -> Path:
    """config.json + model.safetensors + tokenizer files in directory; returns it."""
    tok = tiny_tokenizer()
    hf = tiny_hf_model(seed=seed, vocab_size=tok.vocab_size, **config)
    hf.save_pretrained(directory, safe_serialization=True)
    tok.backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"eos_token": "<|im_end|>", "chat_template": QWEN_LIKE_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory
