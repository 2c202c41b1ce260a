"""Sparsity refinement: heads under the target recall get larger budgets until they pass or hit
the cap; the refined MInference file and the report are written (synthetic recall, then the
real command on a tiny model)."""

from __future__ import annotations

import json

import torch

from longctx.entrypoints import cli
from longctx.sparse.calibrate import RecallStats, calibrate, write_report
from longctx.sparse.config import HeadPattern, SparseConfig
from tests.hf_reference import tiny_hf_model


def fake_measure(config: SparseConfig) -> RecallStats:
    """Head (0, 1) needs slash >= 300, head (1, 0) can never pass; the rest always pass."""
    stats = RecallStats(2, 2)
    for layer, heads in enumerate(config.layers):
        recall = torch.ones(2, 3)
        recall[1] = 0.9 if layer == 0 and heads[1].slash < 300 else 1.0
        if layer == 1:
            recall[0] = 0.5
        stats.record(layer, recall)
    return stats


def test_low_recall_heads_are_raised_until_they_pass_or_cap(tmp_path):
    start = SparseConfig(default_vertical=100, default_slash=100).materialize(2, 2)
    result = calibrate(fake_measure, start, target=0.95, step=1.5, max_vertical=400, max_slash=500)
    assert result.config.pattern(0, 1) == HeadPattern(338, 338, 1.0)  # 100 -> 150 -> 225 -> 338
    assert result.config.pattern(1, 0) == HeadPattern(400, 500, 0.5)  # capped, still low
    assert result.config.pattern(0, 0) == HeadPattern(100, 100, 1.0)  # untouched
    assert (
        abs(float(result.before.mean[0, 1]) - 0.9) < 1e-6 and float(result.after.mean[0, 1]) == 1.0
    )
    paths = write_report(result, tmp_path / "report")
    assert all(p.stat().st_size > 0 for p in paths)
    report = json.loads(paths[0].read_text())
    assert report["summary"]["heads_below_target_before"] == 2
    assert report["summary"]["heads_below_target_after"] == 1
    row = next(r for r in report["heads"] if (r["layer"], r["head"]) == (0, 1))
    assert row["slash_before"] == 100 and row["slash_after"] == 338


def test_calibrate_command_on_a_tiny_model(tmp_path):
    hf = tiny_hf_model(seed=2)
    hf.save_pretrained(tmp_path / "model")
    start = tmp_path / "start.json"
    SparseConfig(default_vertical=2, default_slash=4).materialize(2, 4).save(start)
    out = tmp_path / "refined.json"
    argv = [
        "calibrate", "--model", str(tmp_path / "model"), "--data", "synthetic",
        "--lengths", "160", "--out", str(out), "--sparse-config", str(start),
        "--sparse-last-q", "8", "--rounds", "2", "--max-budget", "64,256",
        "--device", "cpu", "--dtype", "float32", "--block-size", "16",
        "--kv-cache-gib", "0.01", "--max-num-batched-tokens", "64",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    refined = SparseConfig.load(out)
    report = json.loads((tmp_path / "refined_report" / "report.json").read_text())
    low = [r for r in report["heads"] if r["recall_mean_before"] < 0.95]
    assert low  # budgets this small leave heads under the target
    for r in low:
        pattern = refined.pattern(r["layer"], r["head"])
        assert pattern.slash > 4 and pattern.vertical > 2
        assert pattern.score == r["recall_mean_after"]
    assert (tmp_path / "refined_report" / "recall_heatmap.png").stat().st_size > 0
