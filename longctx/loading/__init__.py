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


def random_checkpoint(source: str) -> Checkpoint:
    """A checkpoint whose weights are drawn at random on the target device (speed work: speed
    does not depend on weight values). source: a built-in config name, a config.json file or a
    Hugging Face directory (its tokenizer is kept if it has one)."""
    from pathlib import Path

    from longctx.loading.hf_dir import hf_model_config
    from longctx.tokenizer import Tokenizer

    if source in BUILTIN_CONFIGS:
        return Checkpoint(builtin_config(source), None, f"random:{source}", None)
    path = Path(source).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return Checkpoint(_config_file(path), None, f"random:{path}", None)
    if path.is_dir():
        tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
        return Checkpoint(hf_model_config(path), tokenizer, f"random:{path}", None)
    raise ConfigError(
        f"--random-weights needs a built-in config ({', '.join(BUILTIN_CONFIGS)}), a config.json "
        f"or a model directory; got {source!r}"
    )


def _config_file(path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(json.loads(path.read_text("utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None


__all__ = [
    "BUILTIN_CONFIGS",
    "Checkpoint",
    "builtin_config",
    "default_model_path",
    "fetch_default_model",
    "load_checkpoint",
    "random_checkpoint",
]
