"""Hugging Face directories written by transformers: config, tensors (one file or shards)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longctx.loading import load_checkpoint
from longctx.loading.checkpoint import expected_tensor_names

transformers = pytest.importorskip("transformers")


def _tiny_qwen2(
    tmp_path: Path,
    *,
    tied: bool = False,
    shard: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=[2, 3],
    )
    model = transformers.Qwen2ForCausalLM(config).to(dtype)
    out = tmp_path / "model"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_checkpoint_matches(path: Path, state: dict[str, torch.Tensor]) -> None:
    ck = load_checkpoint(path)
    stream = ck.weights()
    assert inspect.isgenerator(stream)  # streamed, not a dict held in memory
    loaded = dict(stream)
    assert sorted(loaded) == sorted(expected_tensor_names(ck.config))
    for name, tensor in loaded.items():
        assert tensor.dtype == state[name].dtype, name
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


def test_single_file_config_and_tensors(tmp_path):
    path, state = _tiny_qwen2(tmp_path)
    ck = load_checkpoint(path)
    c = ck.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == (
        "qwen2",
        160,
        64,
        96,
    )
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e6, 1e-5, 2048)
    assert c.attention_bias and not c.tie_word_embeddings
    assert c.eos_token_ids == (2, 3) and c.bos_token_id == 1
    assert ck.tokenizer is None  # no tokenizer.json saved
    assert ck.source == str(path)
    _assert_checkpoint_matches(path, state)


def test_sharded_checkpoint(tmp_path):
    path, state = _tiny_qwen2(tmp_path, shard="40KB")
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    _assert_checkpoint_matches(path, state)


def test_tied_embeddings_skip_lm_head(tmp_path):
    path, state = _tiny_qwen2(tmp_path, tied=True)
    ck = load_checkpoint(path)
    assert ck.config.tie_word_embeddings
    names = [name for name, _ in ck.weights()]
    assert "lm_head.weight" not in names
    _assert_checkpoint_matches(path, state)


def test_bfloat16_stays_bfloat16(tmp_path):
    path, state = _tiny_qwen2(tmp_path, dtype=torch.bfloat16)
    assert load_checkpoint(path).config.torch_dtype == "bfloat16"
    _assert_checkpoint_matches(path, state)


def test_shards_without_index_and_extra_tensors(tmp_path):
    """Any *.safetensors files are read; tensors the model does not use are not yielded."""
    path, state = _tiny_qwen2(tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, path / "a.safetensors")
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    save_file({**{n: tensors[n] for n in names[half:]}, **extra}, path / "b.safetensors")
    _assert_checkpoint_matches(path, state)


def test_llama_directory(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ck = load_checkpoint(tmp_path)
    assert ck.config.architecture == "llama" and not ck.config.attention_bias
    state = model.state_dict()
    for name, tensor in ck.weights():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_tokenizer_and_chat_template_from_directory(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    path, _ = _tiny_qwen2(tmp_path)
    raw = RawTokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefgh")}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|im_end|>"])
    raw.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|im_end|>"})
    )
    tok = load_checkpoint(path).tokenizer
    assert tok is not None
    assert tok.chat_template == template
    assert tok.eos_token_ids == (8, 2, 3)  # tokenizer_config eos, then generation_config ids
    assert tok.apply_chat_template([{"role": "user", "content": "abc"}]) == "abc<|im_end|>"
    assert tok.encode("abc") == [0, 1, 2]


def test_builtin_configs():
    from longctx.loading import BUILTIN_CONFIGS, builtin_config

    seven, fourteen = (builtin_config(name) for name in BUILTIN_CONFIGS)
    assert (seven.num_layers, seven.num_heads, seven.num_kv_heads) == (28, 28, 4)
    assert seven.head_dim == fourteen.head_dim == 128
    assert (seven.hidden_size, seven.intermediate_size, seven.vocab_size) == (3584, 18944, 152064)
    assert (fourteen.num_layers, fourteen.num_heads, fourteen.num_kv_heads) == (48, 40, 8)
    assert (fourteen.hidden_size, fourteen.intermediate_size) == (5120, 13824)
    for c in (seven, fourteen):
        assert not c.tie_word_embeddings and c.attention_bias
        assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e7, 1e-5, 1010000)
        assert c.dca is not None
        assert (c.dca.chunk_size, c.dca.local_size) == (262144, 8192)
        assert c.dca.original_max_position_embeddings == 262144
        assert c.eos_token_ids == (151645,) and c.torch_dtype == "bfloat16"


def test_builtin_config_unknown_name():
    from longctx.errors import ConfigError
    from longctx.loading import builtin_config

    with pytest.raises(ConfigError, match="unknown built-in config 'qwen3'"):
        builtin_config("qwen3")
