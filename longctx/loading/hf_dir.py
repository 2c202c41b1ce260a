"""Hugging Face model directories: config.json + safetensors (one file or shards)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from longctx.config import ModelConfig
from longctx.errors import ConfigError, ModelLoadError
from longctx.loading.checkpoint import Checkpoint, check_tensor_names
from longctx.tokenizer import Tokenizer

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def load_hf_dir(directory: Path) -> Checkpoint:
    config = hf_model_config(directory)
    files = safetensors_files(directory)
    location = _tensor_locations(files)  # name -> file, from the files' own headers
    needed = check_tensor_names(location, config, str(directory))
    plan = [(name, location[name]) for name in location if name in needed]
    return Checkpoint(
        config=config,
        tokenizer=_tokenizer(directory),
        source=str(directory),
        weights=lambda: _stream_tensors(plan),
    )


def hf_model_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = f"; to load a GGUF, pass the file itself ({ggufs[0]})" if ggufs else ""
        raise ModelLoadError(
            f"{directory}: no config.json (not a Hugging Face model directory){hint}"
        )
    try:
        return ModelConfig.from_hf(_read_json(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def safetensors_files(directory: Path) -> list[Path]:
    """The index's shards, else model.safetensors, else every *.safetensors in the directory."""
    index = directory / _INDEX_FILE
    if index.is_file():
        return _indexed_shards(index)
    if (directory / _SINGLE_FILE).is_file():
        return [directory / _SINGLE_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{directory}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)"
        )
    return files


def _indexed_shards(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: no weight_map")
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(f"{index}: lists shard {shard.name}, which is missing")
    return shards


def _tensor_locations(files: list[Path]) -> dict[str, Path]:
    """Read each file's header (cheap: no tensor data) to map tensor names to files."""
    location: dict[str, Path] = {}
    for path in files:
        with _open(path) as f:
            location.update(dict.fromkeys(f.keys(), path))
    return location


def _open(path: Path) -> Any:
    """safe_open, with the library's errors (bad header, truncated file) named for the user."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError and OSError come out as various types
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None


def _stream_tensors(plan: list[tuple[str, Path]]) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time, file by file, in the dtype it is stored in."""
    by_file: dict[Path, list[str]] = {}
    for name, path in plan:
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                yield name, _get_tensor(f, name, path)


def _get_tensor(f: Any, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read tensor {name}: {e}") from None


def _tokenizer(directory: Path) -> Tokenizer | None:
    if not (directory / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_hf_dir(directory)
