"""GGUF tensors as transformers loads them: names, [out, in] layout, dequantization, RoPE order.

transformers' GGUF loader is an independent implementation of the llama.cpp -> Hugging Face
mapping, so agreeing with it on every tensor checks all three at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from longctx.loading import load_checkpoint
from longctx.loading.gguf_file import GGUFFile

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")


def _transformers_state_dict(model_class: type, path: Path) -> dict[str, torch.Tensor]:
    model = model_class.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def _assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    if "lm_head.weight" not in ours:  # tied: transformers lists the shared matrix twice
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        torch.testing.assert_close(tensor.float(), theirs[name], rtol=0, atol=0, msg=name)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_llama_gguf_rope_rows_are_unpermuted(tmp_path, gguf_tools):
    heads, kv_heads, hidden, ffn, vocab = 4, 2, 32, 64, 300
    rng = np.random.default_rng(7)
    hf = gguf_tools.random_dense_tensors(
        1, hidden, ffn, hidden, hidden // heads * kv_heads, vocab, bias=False, rng=rng
    )
    stored = dict(hf)
    stored["blk.0.attn_q.weight"] = _llama_cpp_permute(hf["blk.0.attn_q.weight"], heads)
    stored["blk.0.attn_k.weight"] = _llama_cpp_permute(hf["blk.0.attn_k.weight"], kv_heads)
    spec = gguf_tools.GGUFSpec(
        "llama",
        {
            **gguf_tools.tiny_arch_metadata("llama", 1, hidden, ffn, heads, kv_heads),
            "llama.vocab_size": vocab,
            "llama.rope.dimension_count": hidden // heads,
        },
        {name: gguf_tools.f32(a) for name, a in stored.items()},
    )
    path = gguf_tools.write(tmp_path / "llama.gguf", spec)

    ck = load_checkpoint(path)
    ours = dict(ck.weights())
    assert ck.config.architecture == "llama" and not ck.config.attention_bias
    for proj, gguf_name in (("q", "blk.0.attn_q.weight"), ("k", "blk.0.attn_k.weight")):
        torch.testing.assert_close(
            ours[f"model.layers.0.self_attn.{proj}_proj.weight"],
            torch.from_numpy(hf[gguf_name]),
            rtol=0,
            atol=0,
        )
    _assert_same_tensors(ours, _transformers_state_dict(transformers.LlamaForCausalLM, path))


def _trimmed_default_model(source: GGUFFile, out: Path, gguf_tools, rows: int = 512) -> Path:
    """Layers 0 and 2 of the default model (Q5_0, Q8_0, Q6_K, Q4_K, F32 between them) and the
    first `rows` vocabulary rows, quantized bytes copied unchanged."""
    data = np.memmap(source.path, dtype=np.uint8, mode="r")
    tensors = {}
    for t in source.tensors.values():
        raw = np.asarray(data[t.offset : t.offset + t.nbytes]).reshape(
            t.shape[0] if len(t.shape) > 1 else 1, -1
        )
        shape = t.shape
        if t.name in ("token_embd.weight", "output.weight"):
            raw, shape = raw[:rows], (rows, *t.shape[1:])
        name = _renumber(t.name, {"0": "0", "2": "1"})
        if name is not None:
            tensors[name] = gguf_tools.RawTensor(np.ascontiguousarray(raw), shape, t.ggml_type)
    keep = (
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
    )
    metadata = {f"qwen2.{k}": source.metadata[f"qwen2.{k}"] for k in keep}
    metadata.update({"qwen2.block_count": 2, "qwen2.vocab_size": rows})
    return gguf_tools.write(out, gguf_tools.GGUFSpec("qwen2", metadata, tensors))


def _renumber(name: str, layers: dict[str, str]) -> str | None:
    if not name.startswith("blk."):
        return name
    _, layer, rest = name.split(".", 2)
    return f"blk.{layers[layer]}.{rest}" if layer in layers else None


@pytest.mark.slow
def test_default_model_tensors_match_transformers(tmp_path, default_gguf_file, gguf_tools):
    path = _trimmed_default_model(default_gguf_file, tmp_path / "trimmed.gguf", gguf_tools)
    ck = load_checkpoint(path)
    assert ck.tokenizer is None  # weights-only file
    assert not ck.config.tie_word_embeddings  # this GGUF stores output.weight
    ours = dict(ck.weights())
    kinds = {t.ggml_type.name for t in GGUFFile.read(path).tensors.values()}
    assert kinds == {"F32", "Q5_0", "Q8_0", "Q6_K", "Q4_K"}
    _assert_same_tensors(ours, _transformers_state_dict(transformers.Qwen2ForCausalLM, path))
