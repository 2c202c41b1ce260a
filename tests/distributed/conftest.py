import pytest

from tests.hf_reference import tiny_hf_model

VOCAB = 320


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny 4-layer Qwen2 saved as safetensors (worker processes load it by path), with a
    byte-level tokenizer so that text prompts and the CLI work too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_hf_model(seed=7, num_hidden_layers=4, vocab_size=VOCAB).save_pretrained(
        path, safe_serialization=True
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet + [f"<x{i}>" for i in range(VOCAB - 256)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<x0>"])  # the end of sequence (grammars need one)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"eos_token": "<x0>"}')
    return path
