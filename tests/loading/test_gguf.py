"""GGUF loading: config from metadata, tensor names and layout, dequantization, Llama RoPE order."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from longctx.loading import load_checkpoint
from longctx.loading.checkpoint import expected_tensor_names
from longctx.loading.gguf_file import GGUFTensor, dequantize_tensor

_HF_SUFFIX = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    """Independent spelling of the mapping, to check the loader's."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, layer, part, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{_HF_SUFFIX[part]}.{kind}"


def test_tiny_qwen2_gguf_config_names_and_values(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    path = gguf_tools.write(tmp_path / "tiny.gguf", spec)
    ck = load_checkpoint(path)
    c = ck.config
    assert (c.architecture, c.num_layers, c.hidden_size) == ("qwen2", 2, 32)
    assert c.intermediate_size == 64
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (4, 2, 8, 300)
    assert c.tie_word_embeddings and c.attention_bias
    assert c.rms_norm_eps == 1e-6 and c.rope_theta == 10000.0
    assert c.max_position_embeddings == 4096
    assert ck.source == str(path) and ck.tokenizer is not None

    stream = ck.weights()
    assert inspect.isgenerator(stream)
    loaded = dict(stream)
    assert sorted(loaded) == sorted(expected_tensor_names(c))
    for gguf_name, raw in spec.tensors.items():
        got = loaded[hf_name(gguf_name)]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.from_numpy(raw.data), rtol=0, atol=0)


def test_untied_gguf_yields_lm_head(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(1))
    head = np.random.default_rng(2).standard_normal((300, 32)).astype(np.float32)
    spec.tensors["output.weight"] = gguf_tools.f32(head)
    ck = load_checkpoint(gguf_tools.write(tmp_path / "untied.gguf", spec))
    assert not ck.config.tie_word_embeddings
    weights = dict(ck.weights())
    torch.testing.assert_close(weights["lm_head.weight"], torch.from_numpy(head), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.F16, Q.BF16])
def test_dequantize_matches_gguf_reference(qtype):
    """The torch fast paths (Q8_0, Q5_0) and the fallbacks equal gguf.quants bit for bit.

    600 x 1024 values are 19200 blocks: more than one slice of the torch paths.
    """
    values = np.random.default_rng(3).standard_normal((600, 1024)).astype(np.float32) * 3
    values[5, :32] = 0.0  # an all-zero block (scale 0)
    raw = quantize(values, qtype).view(np.uint8).reshape(-1)
    t = GGUFTensor("w", (600, 1024), qtype, offset=0, nbytes=raw.size)
    got = dequantize_tensor(raw, t, Path("mem"))
    ref = torch.from_numpy(dequantize(raw.reshape(600, -1), qtype))
    assert got.shape == (600, 1024)
    want_dtype = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
    assert got.dtype == want_dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=0)


def _hf_shapes(c) -> dict[str, tuple[int, ...]]:
    """[out, in] shapes by name suffix, from the config alone."""
    return {
        "embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "lm_head.weight": (c.vocab_size, c.hidden_size),
        "q_proj.weight": (c.q_size, c.hidden_size),
        "q_proj.bias": (c.q_size,),
        "k_proj.weight": (c.kv_size, c.hidden_size),
        "k_proj.bias": (c.kv_size,),
        "v_proj.weight": (c.kv_size, c.hidden_size),
        "v_proj.bias": (c.kv_size,),
        "o_proj.weight": (c.hidden_size, c.q_size),
        "gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "up_proj.weight": (c.intermediate_size, c.hidden_size),
        "down_proj.weight": (c.hidden_size, c.intermediate_size),
        "norm.weight": (c.hidden_size,),
        "layernorm.weight": (c.hidden_size,),
    }


@pytest.mark.slow
def test_default_model_loads_and_streams(default_gguf, default_gguf_file):
    """load_checkpoint(None) is the default model; every tensor has its HF shape, and a few
    (one per storage type) equal gguf's reference dequantization."""
    ck = load_checkpoint(None)
    assert ck.source == str(default_gguf)
    c = ck.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == (
        "qwen2",
        24,
        896,
        4864,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (14, 2, 64, 151936)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e6, 1e-6, 32768)
    assert c.attention_bias and not c.tie_word_embeddings
    assert c.eos_token_ids == (151645, 151643) and c.bos_token_id == 151643

    shapes = _hf_shapes(c)
    checked = {
        "token_embd.weight",
        "output.weight",
        "blk.0.ffn_down.weight",
        "blk.2.ffn_down.weight",
        "blk.5.attn_q.bias",
    }
    by_hf = {hf_name(n): default_gguf_file.tensors[n] for n in checked}
    data = np.memmap(default_gguf, dtype=np.uint8, mode="r")
    seen = set()
    for name, tensor in ck.weights():
        seen.add(name)
        suffix = next(s for s in shapes if name.endswith(s))
        assert tuple(tensor.shape) == shapes[suffix], name
        assert tensor.dtype == torch.float32
        if name in by_hf:
            t = by_hf[name]  # the first 2048 rows are enough, and numpy is slow on all 151936
            rows = data[t.offset : t.offset + t.nbytes].reshape(
                t.shape[0] if len(t.shape) > 1 else 1, -1
            )[:2048]
            ref = torch.from_numpy(np.array(dequantize(rows, t.ggml_type)))
            torch.testing.assert_close(
                tensor[:2048], ref.reshape(tensor[:2048].shape), rtol=0, atol=0, msg=name
            )
    assert seen == set(expected_tensor_names(c))
