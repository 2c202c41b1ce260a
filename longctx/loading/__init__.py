"""Checkpoint loading: Hugging Face directories, GGUF files, the default model, built-in configs."""

from __future__ import annotations

import json
from importlib import resources

from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.loading.checkpoint import Checkpoint, load_checkpoint
from longctx.loading.default_model import default_model_path, fetch_default_model

BUILTIN_CONFIGS = ("qwen2.5-7b-instruct-1m", "qwen2.5-14b-instruct-1m")


def builtin_config(name: str) -> ModelConfig:
    """The config.json of a model we ship the shape of (for planning memory without weights)."""
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"unknown built-in config {name!r} (known: {', '.join(BUILTIN_CONFIGS)})")
    text = (resources.files("longctx.models") / "configs" / f"{name}.json").read_text("utf-8")
    return ModelConfig.from_hf(json.loads(text))


__all__ = [
    "BUILTIN_CONFIGS",
    "Checkpoint",
    "builtin_config",
    "default_model_path",
    "fetch_default_model",
    "load_checkpoint",
]
