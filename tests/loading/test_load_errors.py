"""Every mistake a user can make with a model path ends in one clear LongctxError line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from longctx.errors import ConfigError, LongctxError, ModelLoadError
from longctx.loading import load_checkpoint

_QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rope_theta": 10000.0,
}


def _fails(path: Path | str, *fragments: str, kind: type[LongctxError] = ModelLoadError) -> str:
    """Load `path`; assert the error is `kind`, one line, naming the path and the problem."""
    with pytest.raises(kind) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _hf_dir(tmp_path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config or _QWEN2_CONFIG))
    if tensors is not None:
        save_file(tensors, directory / "model.safetensors")
    return directory


def _tiny_tensors() -> dict[str, torch.Tensor]:
    from longctx.config import ModelConfig
    from longctx.loading.checkpoint import expected_tensor_names

    config = ModelConfig.from_hf(_QWEN2_CONFIG)
    shapes = {
        "embed_tokens": (16, 8),
        "lm_head": (16, 8),
        "q_proj.weight": (8, 8),
        "k_proj.weight": (4, 8),
        "v_proj.weight": (4, 8),
        "o_proj": (8, 8),
        "q_proj.bias": (8,),
        "k_proj.bias": (4,),
        "v_proj.bias": (4,),
        "gate_proj": (16, 8),
        "up_proj": (16, 8),
        "down_proj": (8, 16),
        "norm": (8,),
    }

    def shape(name: str) -> tuple[int, ...]:
        return next(s for key, s in shapes.items() if key in name)

    return {name: torch.zeros(shape(name)) for name in expected_tensor_names(config)}


# ---- paths --------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    _fails(tmp_path / "nope", "model path not found", str(tmp_path / "nope"))


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    _fails(path, str(path), "not a model directory")


# ---- Hugging Face directories -------------------------------------------------------------------


def test_directory_without_config(tmp_path):
    _fails(tmp_path, str(tmp_path), "no config.json")


def test_directory_with_a_gguf_suggests_the_file(tmp_path):
    (tmp_path / "model-q4.gguf").write_bytes(b"GGUF")
    _fails(tmp_path, "no config.json", "pass the file itself (model-q4.gguf)")


def test_invalid_config_json(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "config.json").write_text("{oops")
    _fails(directory, "config.json", "invalid JSON")


def test_unsupported_hf_architecture(tmp_path):
    directory = _hf_dir(tmp_path, {"architectures": ["BertModel"], "model_type": "bert"})
    _fails(directory, "config.json", "unsupported model architecture", kind=ConfigError)


def test_config_missing_key(tmp_path):
    config = {k: v for k, v in _QWEN2_CONFIG.items() if k != "hidden_size"}
    _fails(_hf_dir(tmp_path, config), "config.json", "hidden_size", kind=ConfigError)


def test_scaled_rope_refused(tmp_path):
    config = {**_QWEN2_CONFIG, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    _fails(_hf_dir(tmp_path, config), "config.json", "RoPE scaling 'yarn'", kind=ConfigError)


def test_no_safetensors(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "pytorch_model.bin").write_bytes(b"\0" * 16)
    _fails(directory, str(directory), "no *.safetensors")


def test_truncated_safetensors(tmp_path):
    directory = _hf_dir(tmp_path, tensors=_tiny_tensors())
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails(directory, str(weights), "not a readable safetensors file")


def test_garbage_safetensors(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    _fails(directory, "model.safetensors", "not a readable safetensors file")


def test_index_names_missing_shard(tmp_path):
    directory = _hf_dir(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(directory, "model.safetensors.index.json", "model-00001-of-00002.safetensors", "missing")


def test_missing_tensor(tmp_path):
    tensors = _tiny_tensors()
    del tensors["model.layers.0.mlp.up_proj.weight"]
    directory = _hf_dir(tmp_path, tensors=tensors)
    _fails(directory, str(directory), "lacks tensor model.layers.0.mlp.up_proj.weight")


def test_complete_tiny_directory_loads(tmp_path):
    """Control for the cases above: the same directory, intact, loads."""
    ck = load_checkpoint(_hf_dir(tmp_path, tensors=_tiny_tensors()))
    assert len(list(ck.weights())) == len(_tiny_tensors())


def _tiny_gguf(tmp_path: Path, gguf_tools) -> Path:
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    return gguf_tools.write(tmp_path / "m.gguf", spec)


# ---- GGUF ---------------------------------------------------------------------------------------


def test_gguf_garbage(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    _fails(path, str(path), "not a GGUF file")


def test_gguf_empty(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    _fails(path, str(path), "not a GGUF file")


def test_gguf_magic_without_suffix_is_detected(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    path = gguf_tools.write(tmp_path / "weights.bin", spec)
    assert load_checkpoint(path).config.architecture == "qwen2"


def test_gguf_truncated_in_tensor_data(tmp_path, gguf_tools):
    path = _tiny_gguf(tmp_path, gguf_tools)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _fails(path, str(path), "truncated GGUF: tensor")


@pytest.mark.parametrize("keep", [10, 30, 2000])
def test_gguf_truncated_in_header(tmp_path, gguf_tools, keep):
    path = _tiny_gguf(tmp_path, gguf_tools)
    path.write_bytes(path.read_bytes()[:keep])
    _fails(path, str(path), "truncated or corrupt GGUF")


def test_gguf_header_corrupted_counts(tmp_path, gguf_tools):
    path = _tiny_gguf(tmp_path, gguf_tools)
    data = bytearray(path.read_bytes())
    data[16:24] = (2**60).to_bytes(8, "little")  # n_kv
    path.write_bytes(bytes(data))
    _fails(path, str(path), "corrupt GGUF")


def test_gguf_unsupported_version(tmp_path, gguf_tools):
    path = _tiny_gguf(tmp_path, gguf_tools)
    data = bytearray(path.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    _fails(path, str(path), "unsupported GGUF version 1")


@pytest.mark.parametrize("arch", ["bert", "llama4", "qwen3"])
def test_gguf_unsupported_architecture(tmp_path, gguf_tools, arch):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0), arch=arch)
    path = gguf_tools.write(tmp_path / f"{arch}.gguf", spec)
    _fails(path, str(path), f"GGUF architecture '{arch}' is not supported")


def test_gguf_bad_alignment(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    spec.metadata["general.alignment"] = 0
    path = tmp_path / "m.gguf"
    try:
        gguf_tools.write(path, spec)
    except (ValueError, ZeroDivisionError):  # the writer itself refuses; patch the header
        spec.metadata["general.alignment"] = 32
        gguf_tools.write(path, spec)
        data = path.read_bytes()
        key = b"general.alignment"
        at = data.index(key) + len(key) + 4  # past the key and its u32 type
        path.write_bytes(data[:at] + (0).to_bytes(4, "little") + data[at + 4 :])
    _fails(path, str(path), "general.alignment = 0")


def test_gguf_missing_tensor(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0), drop=("blk.1.ffn_up.weight",))
    path = gguf_tools.write(tmp_path / "m.gguf", spec)
    _fails(path, str(path), "lacks tensor model.layers.1.mlp.up_proj.weight")


def test_gguf_missing_metadata(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    del spec.metadata["qwen2.feed_forward_length"]
    path = gguf_tools.write(tmp_path / "m.gguf", spec)
    _fails(path, str(path), "lacks 'qwen2.feed_forward_length'")


def test_gguf_unknown_tensor(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    spec.tensors["rope_freqs.weight"] = gguf_tools.f32(np.ones(4, dtype=np.float32))
    path = gguf_tools.write(tmp_path / "m.gguf", spec)
    _fails(path, str(path), "'rope_freqs.weight' is not supported")


def test_gguf_scaled_rope_refused(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    spec.metadata["qwen2.rope.scaling.type"] = "yarn"
    path = gguf_tools.write(tmp_path / "m.gguf", spec)
    _fails(path, str(path), "RoPE scaling 'yarn' is not supported")


def test_gguf_metadata_of_wrong_type(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    spec.metadata["qwen2.block_count"] = "two"
    path = gguf_tools.write(tmp_path / "m.gguf", spec)
    _fails(path, str(path), "'qwen2.block_count' is not a number")


def test_gguf_bad_config_values(tmp_path, gguf_tools):
    spec = gguf_tools.tiny_qwen2_spec(np.random.default_rng(0))
    spec.metadata["qwen2.attention.head_count_kv"] = 3  # 4 heads are not a multiple of 3
    path = gguf_tools.write(tmp_path / "m.gguf", spec)
    _fails(path, str(path), "num_kv_heads", kind=ConfigError)


@pytest.mark.slow
def test_real_gguf_truncated(tmp_path, default_gguf):
    """A partial download of the real model: the header is intact, the tensors run short."""
    path = tmp_path / "partial.gguf"
    with default_gguf.open("rb") as src:
        path.write_bytes(src.read(50 << 20))
    _fails(path, str(path), "truncated GGUF: tensor", "but the file has 52428800 bytes")
