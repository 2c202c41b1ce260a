"""The MInference pattern file and where a sparse config comes from."""

from __future__ import annotations

import json
import types

import pytest

from longctx.entrypoints.engine_args import sparse_from_args
from longctx.errors import ConfigError
from longctx.sparse.config import (
    CONFIG_FILENAME,
    HeadPattern,
    SparseConfig,
    resolve_sparse_config,
)


def minference_file():
    return [
        {"0": ["vertical_and_slash", 1000, 6096, 0.97], "1": ["vertical_and_slash", 30, 800, 0.5]},
        {"1": ["vertical_and_slash", 3500, 100, 0.25], "0": ["vertical_and_slash", 100, 50, 1]},
    ]


def test_minference_round_trip(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(minference_file()))
    cfg = SparseConfig.load(path, threshold=100, last_q=32)
    assert cfg.pattern(0, 1) == HeadPattern(30, 800, 0.5)
    assert cfg.pattern(1, 0) == HeadPattern(100, 50, 1.0)  # keys sorted by head index
    assert (cfg.threshold, cfg.last_q, cfg.source) == (100, 32, str(path))
    cfg.save(tmp_path / "q.json")
    again = json.loads((tmp_path / "q.json").read_text())
    assert again == [
        {k: [v[0], v[1], v[2], float(v[3])] for k, v in sorted(lyr.items())}
        for lyr in minference_file()
    ]
    assert SparseConfig.load(tmp_path / "q.json").layers == cfg.layers


def test_defaults_fill_missing_layers_and_heads():
    cfg = SparseConfig.from_minference(minference_file()[:1])
    assert cfg.budgets(0, 3) == ([1000, 30, 1000], [6096, 800, 6096])
    assert cfg.budgets(5, 2) == ([1000, 1000], [6096, 6096])
    full = cfg.materialize(num_layers=3, num_heads=2)
    assert len(full.layers) == 3 and all(len(h) == 2 for h in full.layers)
    assert full.to_minference()[2]["1"] == ["vertical_and_slash", 1000, 6096, 0.0]


@pytest.mark.parametrize(
    "data,match",
    [
        ({"0": []}, "list with one entry per layer"),
        ([{"0": ["block_sparse", 1, 2, 0]}], "not supported"),
        ([{"0": ["vertical_and_slash", "a", 2, 0]}], "integers"),
        ([{"1": ["vertical_and_slash", 1, 2, 0]}], "heads must be 0..n-1"),
        ([{"0": ["vertical_and_slash", -1, 2, 0]}], ">= 0"),
    ],
)
def test_bad_files_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        SparseConfig.from_minference(data)


def test_shape_mismatch_with_model_is_refused():
    cfg = SparseConfig.from_minference(minference_file())
    with pytest.raises(ConfigError, match="layers"):
        cfg.check_model(num_layers=1, num_heads=2)
    with pytest.raises(ConfigError, match="heads"):
        cfg.check_model(num_layers=2, num_heads=1)


def test_resolve_from_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sparse_attention_threshold": 4096}))
    assert resolve_sparse_config(None, tmp_path) is None  # no pattern file: dense
    (tmp_path / CONFIG_FILENAME).write_text(json.dumps(minference_file()))
    cfg = resolve_sparse_config(None, tmp_path)
    assert cfg.threshold == 4096 and cfg.pattern(0, 1).slash == 800
    assert resolve_sparse_config(None, tmp_path, last_q=16).last_q == 16
    assert resolve_sparse_config(False, tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"sparse_attention_enabled": False}))
    assert resolve_sparse_config(None, tmp_path) is None


def test_resolve_inline_and_enabled_keys(tmp_path):
    hf = {"sparse_attention_config": minference_file(), "sparse_attention_last_q": 8}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = resolve_sparse_config(None, tmp_path)
    assert cfg.last_q == 8 and cfg.pattern(1, 1).vertical == 3500
    (tmp_path / "config.json").write_text(json.dumps({"sparse_attention_enabled": True}))
    assert resolve_sparse_config(None, tmp_path).layers == ()  # defaults everywhere


def test_resolve_explicit_specs(tmp_path):
    assert resolve_sparse_config("default").pattern(3, 3) == HeadPattern(1000, 6096)
    assert resolve_sparse_config(SparseConfig(threshold=5), threshold=7).threshold == 7
    with pytest.raises(ConfigError, match="not found"):
        resolve_sparse_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="need a sparse config"):
        resolve_sparse_config(None, None, threshold=10)


def _args(**kw):
    base = dict(
        model=None,
        no_sparse=False,
        sparse_config=None,
        sparse_threshold=None,
        sparse_last_q=None,
        sparse_dca_budget=None,
        sparse_slash_unit=None,
    )
    return types.SimpleNamespace(**{**base, **kw})


def test_cli_flags(tmp_path):
    assert sparse_from_args(_args()) is None
    assert sparse_from_args(_args(no_sparse=True)) is False
    cfg = sparse_from_args(_args(sparse_config="default", sparse_threshold=100, sparse_last_q=4))
    assert (cfg.threshold, cfg.last_q, cfg.dca_budget) == (100, 4, "shared")
    cfg = sparse_from_args(_args(sparse_config="default", sparse_dca_budget="per_part"))
    assert cfg.dca_budget == "per_part"
    assert cfg.slash_unit == "tile"  # the engine's default: budgets in kernel tiles
    cfg = sparse_from_args(_args(sparse_config="default", sparse_slash_unit="diagonal"))
    assert cfg.slash_unit == "diagonal"
    with pytest.raises(ConfigError, match="dca_budget must be one of shared, per_part"):
        SparseConfig(dca_budget="each")
    with pytest.raises(ConfigError, match="slash_unit must be one of tile, diagonal"):
        SparseConfig(slash_unit="lines")
    with pytest.raises(ConfigError, match="exclude"):
        sparse_from_args(_args(no_sparse=True, sparse_config="default"))
