"""Sparse-prefill settings and the MInference pattern file.

A pattern file (`sparse_attention_config.json`, beside config.json or anywhere) is a list with
one entry per layer; each entry maps a head index (as a string) to
`["vertical_and_slash", vertical_size, slash_size, score]`:

    [{"0": ["vertical_and_slash", 1000, 6096, 0.97], "1": [...], ...},   # layer 0
     {"0": [...], ...}, ...]                                             # layer 1, ...

vertical_size key columns and slash_size diagonals are kept per head (with DCA: over all key
parts, or in each with dca_budget "per_part"); `score` is informational (the search or
calibration recall). Heads or layers the file does not list use the defaults (1000 vertical /
6096 slash). `threshold`: a prefill chunk goes
sparse only when its sequence's cached length after the chunk passes it (shorter prompts stay
dense and exact); `last_q`: how many of a chunk's last queries estimate the pattern.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.errors import ConfigError

CONFIG_FILENAME = "sparse_attention_config.json"
PATTERN_NAME = "vertical_and_slash"
DEFAULT_VERTICAL = 1000
DEFAULT_SLASH = 6096
DEFAULT_THRESHOLD = 32768
DEFAULT_LAST_Q = 64
DCA_BUDGETS = ("shared", "per_part")
SLASH_UNITS = ("tile", "diagonal")  # longctx/sparse/estimate.py, "Slash unit"
BUILTIN_DEFAULT = "default"  # --sparse-config default: the default budget for every head


@dataclass(frozen=True)
class HeadPattern:
    """One head's budget: vertical columns and slash diagonals kept (per DCA part)."""

    vertical: int
    slash: int
    score: float = 0.0

    def __post_init__(self) -> None:
        if self.vertical < 0 or self.slash < 0:
            raise ConfigError(f"sparse budgets must be >= 0, got {self.vertical}, {self.slash}")


@dataclass(frozen=True)
class SparseConfig:
    """Per-layer, per-head vertical-slash budgets plus when and how sparse prefill runs.

    layers[l][h] is head h of layer l; an empty `layers` (or a missing layer/head) falls back
    to the default budget.
    """

    layers: tuple[tuple[HeadPattern, ...], ...] = ()
    threshold: int = DEFAULT_THRESHOLD
    last_q: int = DEFAULT_LAST_Q
    default_vertical: int = DEFAULT_VERTICAL
    default_slash: int = DEFAULT_SLASH
    # With DCA: one budget per head over all key parts, or the whole budget in each part
    # (longctx/sparse/estimate.py).
    dca_budget: str = "shared"
    # What a slash budget counts: keys per row in whole kernel tiles, or MInference's diagonals
    # (longctx/sparse/estimate.py).
    slash_unit: str = "tile"
    source: str | None = None  # where the patterns came from, for messages

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError(f"sparse threshold must be >= 0, got {self.threshold}")
        if self.last_q < 1:
            raise ConfigError(f"sparse last_q must be >= 1, got {self.last_q}")
        if self.default_vertical < 0 or self.default_slash < 0:
            raise ConfigError("default sparse budgets must be >= 0")
        if self.dca_budget not in DCA_BUDGETS:
            raise ConfigError(
                f"sparse dca_budget must be one of {', '.join(DCA_BUDGETS)}, "
                f"got {self.dca_budget!r}"
            )
        if self.slash_unit not in SLASH_UNITS:
            raise ConfigError(
                f"sparse slash_unit must be one of {', '.join(SLASH_UNITS)}, "
                f"got {self.slash_unit!r}"
            )

    def pattern(self, layer: int, head: int) -> HeadPattern:
        if layer < len(self.layers) and head < len(self.layers[layer]):
            return self.layers[layer][head]
        return HeadPattern(self.default_vertical, self.default_slash)

    def budgets(self, layer: int, num_heads: int) -> tuple[list[int], list[int]]:
        """(vertical sizes, slash sizes) of every head of one layer."""
        pats = [self.pattern(layer, h) for h in range(num_heads)]
        return [p.vertical for p in pats], [p.slash for p in pats]

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """Refuse a pattern file written for another model shape."""
        where = f" ({self.source})" if self.source else ""
        if len(self.layers) > num_layers:
            raise ConfigError(
                f"sparse config has {len(self.layers)} layers but the model has {num_layers}"
                + where
            )
        for i, heads in enumerate(self.layers):
            if len(heads) > num_heads:
                raise ConfigError(
                    f"sparse config layer {i} has {len(heads)} heads but the model has "
                    f"{num_heads} attention heads" + where
                )

    def materialize(self, num_layers: int, num_heads: int) -> SparseConfig:
        """The same budgets with every layer and head listed explicitly."""
        self.check_model(num_layers, num_heads)
        layers = tuple(
            tuple(self.pattern(lyr, h) for h in range(num_heads)) for lyr in range(num_layers)
        )
        return dataclasses.replace(self, layers=layers)

    # --- MInference format ---------------------------------------------------------------
    def to_minference(self) -> list[dict[str, list[Any]]]:
        return [
            {str(h): [PATTERN_NAME, p.vertical, p.slash, p.score] for h, p in enumerate(heads)}
            for heads in self.layers
        ]

    @classmethod
    def from_minference(cls, data: Any, source: str | None = None, **kwargs: Any) -> SparseConfig:
        where = f" in {source}" if source else ""
        if not isinstance(data, list):
            raise ConfigError(f"sparse config must be a list with one entry per layer{where}")
        layers = tuple(_parse_layer(i, entry, where) for i, entry in enumerate(data))
        return cls(layers=layers, source=source, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> SparseConfig:
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"sparse config not found: {p}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read sparse config {p}: {e}") from None
        return cls.from_minference(data, source=str(p), **kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        """One layer per line."""
        lines = ",\n".join(" " + json.dumps(layer) for layer in self.to_minference())
        Path(path).write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def _parse_layer(index: int, entry: Any, where: str) -> tuple[HeadPattern, ...]:
    if not isinstance(entry, dict):
        raise ConfigError(f"sparse config layer {index} must be an object{where}")
    try:
        heads = sorted((int(k), v) for k, v in entry.items())
    except ValueError:
        raise ConfigError(
            f"sparse config layer {index}: head keys must be integers{where}"
        ) from None
    if [h for h, _ in heads] != list(range(len(heads))):
        raise ConfigError(f"sparse config layer {index}: heads must be 0..n-1{where}")
    return tuple(_parse_head(index, h, v, where) for h, v in heads)


def _parse_head(layer: int, head: int, value: Any, where: str) -> HeadPattern:
    at = f"sparse config layer {layer} head {head}"
    if not isinstance(value, list) or len(value) < 3:
        raise ConfigError(f'{at}: expected ["{PATTERN_NAME}", vertical, slash, score]{where}')
    if value[0] != PATTERN_NAME:
        raise ConfigError(
            f"{at}: pattern {value[0]!r} is not supported (only {PATTERN_NAME!r}){where}"
        )
    try:
        vertical, slash = int(value[1]), int(value[2])
        score = float(value[3]) if len(value) > 3 else 0.0
    except (TypeError, ValueError):
        raise ConfigError(f"{at}: sizes must be integers, got {value[1:3]!r}{where}") from None
    return HeadPattern(vertical, slash, score)


# --- where a config comes from -------------------------------------------------------------


def resolve_sparse_config(
    spec: SparseConfig | str | os.PathLike[str] | bool | None,
    model: str | os.PathLike[str] | None = None,
    *,
    threshold: int | None = None,
    last_q: int | None = None,
    dca_budget: str | None = None,
    slash_unit: str | None = None,
) -> SparseConfig | None:
    """Turn what the user gave into a SparseConfig, or None for dense prefill.

    spec: a SparseConfig; a pattern file path; "default" (default budgets everywhere); False
    (off); None or True (look at the model: a `sparse_attention_config.json` beside its
    config.json, or the config.json keys `sparse_attention_config` / `sparse_attention_enabled`
    / `sparse_attention_threshold` / `sparse_attention_last_q`; True turns defaults on when the
    model has nothing). threshold / last_q / dca_budget / slash_unit override whatever was found.
    """
    if spec is False:
        return None
    if isinstance(spec, SparseConfig):
        config: SparseConfig | None = spec
    elif spec is None or spec is True:
        config = from_model_dir(model)
        if config is None and spec is True:
            config = SparseConfig(source=BUILTIN_DEFAULT)
    elif str(spec) == BUILTIN_DEFAULT:
        config = SparseConfig(source=BUILTIN_DEFAULT)
    else:
        config = SparseConfig.load(spec)
    if config is None:
        if any(x is not None for x in (threshold, last_q, dca_budget, slash_unit)):
            raise ConfigError(
                "--sparse-threshold / --sparse-last-q / --sparse-dca-budget / "
                "--sparse-slash-unit need a sparse config: pass "
                f"--sparse-config PATH (or 'default'), or a model with {CONFIG_FILENAME}"
            )
        return None
    overrides = {
        "threshold": threshold,
        "last_q": last_q,
        "dca_budget": dca_budget,
        "slash_unit": slash_unit,
    }
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def from_model_dir(model: str | os.PathLike[str] | None) -> SparseConfig | None:
    """The sparse settings a Hugging Face model directory carries, if any."""
    if model is None or not Path(model).expanduser().is_dir():
        return None
    root = Path(model).expanduser()
    hf = _read_json(root / "config.json") or {}
    if hf.get("sparse_attention_enabled") is False:
        return None
    kwargs = {
        "threshold": int(hf.get("sparse_attention_threshold", DEFAULT_THRESHOLD)),
        "last_q": int(hf.get("sparse_attention_last_q", DEFAULT_LAST_Q)),
    }
    inline = hf.get("sparse_attention_config")
    if isinstance(inline, list):
        return SparseConfig.from_minference(inline, source=str(root / "config.json"), **kwargs)
    candidates = [root / inline] if isinstance(inline, str) else []
    for path in [*candidates, root / CONFIG_FILENAME]:
        if path.is_file():
            return SparseConfig.load(path, **kwargs)
    if hf.get("sparse_attention_enabled"):
        return SparseConfig(source=str(root / "config.json"), **kwargs)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else None
