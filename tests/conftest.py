import os

import torch

# The Triton interpreter must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


def device_under_test() -> torch.device:
    """Device the device-generic tests run on: LONGCTX_TEST_DEVICE (default cpu)."""
    return torch.device(os.environ.get("LONGCTX_TEST_DEVICE", "cpu"))


# tests/gpu holds what only a CUDA device can run (CUDA graphs, kernel speed paths); they are run
# on the GPU machine (`pytest tests/gpu`) and not collected at all elsewhere.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]


def tiny_config_file(directory, **overrides):
    """Write the config.json of a tiny random Qwen2 (2 layers, GQA 4/2, head_dim 8) into
    directory, with overrides; returns its path."""
    import json
    from pathlib import Path

    cfg = dict(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    path = Path(directory) / "config.json"
    path.write_text(json.dumps(cfg))
    return path
