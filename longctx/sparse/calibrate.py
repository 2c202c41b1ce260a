"""Sparsity refinement (offline): raise the budgets of heads whose attention recall is low.

Recall of a head on a query row = exp(lse_sparse - lse_full): the share of the row's softmax
mass that lands on the keys the sparse pattern keeps (lse_full over every key the row may see,
DCA parts included). A calibration round prefills the calibration sequences through the engine
with a sparse backend that records, per layer and q head, the recall of sampled rows of every
sparse segment (RECALL_ROWS evenly spaced rows plus the estimation rows); the backend runs the
normal forward, so later layers see what deployment would give them.

Heads whose mean recall is under the target get both budgets multiplied by `step` (default
1.5: a geometric search reaches a 4x larger budget in 4 rounds while overshooting the needed
size by at most 50%), capped at max_vertical / max_slash; rounds repeat until every head
passes, every failing head sits at its cap, or max_rounds is reached. The refined pattern
file stores each head's final mean recall as its score.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from longctx.sparse.config import HeadPattern, SparseConfig

DEFAULT_TARGET = 0.95
DEFAULT_STEP = 1.5
DEFAULT_MAX_ROUNDS = 6
MIN_RAISED = 16  # a budget of 0 grows to MIN_RAISED * step


class RecallStats:
    """Per (layer, q head): mean and minimum recall over every recorded row."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.sums = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.counts = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.mins = torch.full((num_layers, num_heads), float("inf"), dtype=torch.float64)

    def record(self, layer: int, recall: torch.Tensor) -> None:
        r = recall.detach().double().cpu()  # [Hq, rows]
        self.sums[layer] += r.sum(1)
        self.counts[layer] += r.shape[1]
        self.mins[layer] = torch.minimum(self.mins[layer], r.min(1).values)

    def mean(self) -> torch.Tensor:
        """[L, H]; NaN where nothing was recorded (no sparse segment reached the layer)."""
        return self.sums / self.counts

    def min(self) -> torch.Tensor:
        return torch.where(self.counts > 0, self.mins, torch.nan)


Measure = Callable[[SparseConfig], RecallStats]


@dataclass(frozen=True)
class CalibrationRound:
    vertical: torch.Tensor  # [L, H] budgets measured in this round
    slash: torch.Tensor
    mean: torch.Tensor  # [L, H] recall
    min: torch.Tensor


@dataclass(frozen=True)
class CalibrationResult:
    config: SparseConfig  # refined; scores = final mean recall
    rounds: tuple[CalibrationRound, ...]
    target: float
    step: float
    max_vertical: int
    max_slash: int

    @property
    def before(self) -> CalibrationRound:
        return self.rounds[0]

    @property
    def after(self) -> CalibrationRound:
        return self.rounds[-1]


def calibrate(
    measure: Measure,
    start: SparseConfig,
    *,
    target: float = DEFAULT_TARGET,
    step: float = DEFAULT_STEP,
    max_vertical: int,
    max_slash: int,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    on_round: Callable[[int, CalibrationRound], None] | None = None,
) -> CalibrationResult:
    """start must list every layer and head (SparseConfig.materialize). on_round sees each
    measurement round as it finishes."""
    if not 0.0 < target <= 1.0 or step <= 1.0:
        raise ValueError(f"need 0 < target <= 1 and step > 1, got {target}, {step}")
    config = start
    rounds = [_round(config, measure(config))]
    if on_round is not None:
        on_round(0, rounds[0])
    for r in range(max_rounds):
        low = rounds[-1].mean < target  # NaN (never measured) compares False
        config, raised = raise_budgets(config, low, step, max_vertical, max_slash)
        if not raised:
            break
        rounds.append(_round(config, measure(config)))
        if on_round is not None:
            on_round(r + 1, rounds[-1])
    final = with_scores(config, rounds[-1].mean)
    return CalibrationResult(final, tuple(rounds), target, step, max_vertical, max_slash)


def _round(config: SparseConfig, stats: RecallStats) -> CalibrationRound:
    vertical, slash = budget_tables(config)
    return CalibrationRound(vertical, slash, stats.mean(), stats.min())


def budget_tables(config: SparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    vertical = torch.tensor([[p.vertical for p in heads] for heads in config.layers])
    slash = torch.tensor([[p.slash for p in heads] for heads in config.layers])
    return vertical, slash


def raise_budgets(
    config: SparseConfig, low: torch.Tensor, step: float, max_vertical: int, max_slash: int
) -> tuple[SparseConfig, bool]:
    """Multiply the budgets of heads flagged in low [L, H] by step (capped); and whether any
    budget moved."""
    grow = lambda b, cap: min(cap, max(b, math.ceil(max(b, MIN_RAISED) * step)))
    layers, raised = [], False
    for lyr, heads in enumerate(config.layers):
        new = []
        for h, p in enumerate(heads):
            if bool(low[lyr, h]):
                q = HeadPattern(grow(p.vertical, max_vertical), grow(p.slash, max_slash), p.score)
                raised |= q != p
                p = q
            new.append(p)
        layers.append(tuple(new))
    return dataclasses.replace(config, layers=tuple(layers)), raised


def with_scores(config: SparseConfig, recall: torch.Tensor) -> SparseConfig:
    layers = tuple(
        tuple(dataclasses.replace(p, score=_score(recall[lyr, h])) for h, p in enumerate(heads))
        for lyr, heads in enumerate(config.layers)
    )
    return dataclasses.replace(config, layers=layers)


def _score(x: torch.Tensor) -> float:
    v = float(x)
    return round(v, 5) if math.isfinite(v) else 0.0


def engine_measure(llm, sequences: Sequence[list[int]]) -> Measure:
    """A Measure that prefills every sequence through `llm` (a longctx.LLM) with a recording
    sparse backend swapped into its runner; threshold 0, so every prefill chunk is sparse."""
    from longctx.layers.attention.sparse_backend import SparseAttentionBackend
    from longctx.sampling_params import SamplingParams

    runner = llm.engine.runner
    model = runner.config
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def measure(config: SparseConfig) -> RecallStats:
        stats = RecallStats(model.num_layers, model.num_heads)
        every_chunk = dataclasses.replace(config, threshold=0)
        original = runner.backend
        dense = original.dense if isinstance(original, SparseAttentionBackend) else original
        runner.backend = SparseAttentionBackend(model, every_chunk, dense, recorder=stats)
        try:
            for ids in sequences:
                llm.generate([ids], params)
        finally:
            runner.backend = original
        return stats

    return measure


# --- calibration data --------------------------------------------------------------------------


def calibration_sequences(
    sources: Sequence[str],
    lengths: Sequence[int],
    *,
    encode: Callable[[str], list[int]] | None,
    vocab_size: int,
    seed: int = 0,
) -> list[list[int]]:
    """One token sequence per (source, length). A source is a text file (its tokens repeated
    to reach the length, then cut) or "synthetic": random tokens that repeat random earlier
    spans, so some heads have something to retrieve."""
    seqs = []
    for i, src in enumerate(sources):
        for n in lengths:
            if src == "synthetic":
                seqs.append(synthetic_tokens(n, vocab_size, seed + 1000 * i + n))
            else:
                seqs.append(_file_tokens(src, n, encode))
    return seqs


def synthetic_tokens(length: int, vocab_size: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (length,), generator=g)
    span = max(1, min(64, length // 16))
    for _ in range(length // (4 * span)):  # copy spans: ~1/4 of the tokens repeat earlier ones
        src, dst = torch.randint(0, max(1, length - span), (2,), generator=g).tolist()
        ids[dst : dst + span] = ids[src : src + span].clone()
    return ids.tolist()


def _file_tokens(path: str, length: int, encode: Callable[[str], list[int]] | None) -> list[int]:
    from longctx.errors import LongctxError

    if encode is None:
        raise LongctxError(f"{path}: this model has no tokenizer; use --data synthetic")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LongctxError(f"cannot read calibration file {path}: {e}") from None
    ids = encode(text)
    if not ids:
        raise LongctxError(f"calibration file {path} has no tokens")
    return (ids * -(-length // len(ids)))[:length]


# --- the report ----------------------------------------------------------------------------------


def write_report(result: CalibrationResult, directory: Path) -> list[Path]:
    """report.json (every head, before and after), report.md (summary and the heads that
    changed) and recall_heatmap.png (layer x head, before and after)."""
    directory.mkdir(parents=True, exist_ok=True)
    summary = report_summary(result)
    paths = [directory / "report.json", directory / "report.md", directory / "recall_heatmap.png"]
    paths[0].write_text(json.dumps({"summary": summary, "heads": head_rows(result)}, indent=1))
    paths[1].write_text(report_markdown(result, summary))
    heatmap(result, paths[2])
    return paths


def _stats(x: torch.Tensor) -> dict[str, float | None]:
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return {"mean": None, "min": None}
    return {"mean": round(float(finite.mean()), 5), "min": round(float(finite.min()), 5)}


def report_summary(result: CalibrationResult) -> dict:
    b, a = result.before, result.after
    below = lambda r: int((r.mean < result.target).sum())
    return {
        "target_recall": result.target,
        "step": result.step,
        "max_vertical": result.max_vertical,
        "max_slash": result.max_slash,
        "rounds": len(result.rounds),
        "recall_before": _stats(b.mean),
        "recall_after": _stats(a.mean),
        "row_min_recall_before": _stats(b.min)["min"],
        "row_min_recall_after": _stats(a.min)["min"],
        "heads_below_target_before": below(b),
        "heads_below_target_after": below(a),
        "heads_raised": int(((a.vertical != b.vertical) | (a.slash != b.slash)).sum()),
        "mean_vertical_after": float(a.vertical.double().mean()),
        "mean_slash_after": float(a.slash.double().mean()),
    }


def head_rows(result: CalibrationResult) -> list[dict]:
    b, a = result.before, result.after
    num = lambda x: None if not math.isfinite(float(x)) else round(float(x), 5)
    layers, heads = b.mean.shape
    return [
        {
            "layer": lyr,
            "head": h,
            "vertical_before": int(b.vertical[lyr, h]),
            "slash_before": int(b.slash[lyr, h]),
            "recall_mean_before": num(b.mean[lyr, h]),
            "recall_min_before": num(b.min[lyr, h]),
            "vertical_after": int(a.vertical[lyr, h]),
            "slash_after": int(a.slash[lyr, h]),
            "recall_mean_after": num(a.mean[lyr, h]),
            "recall_min_after": num(a.min[lyr, h]),
        }
        for lyr in range(layers)
        for h in range(heads)
    ]


def report_markdown(result: CalibrationResult, summary: dict) -> str:
    lines = [
        "# Sparse attention calibration",
        "",
        f"Target mean recall per head {result.target}; budgets x{result.step} per round "
        f"(caps: vertical {result.max_vertical}, slash {result.max_slash}); "
        f"{summary['rounds']} measurement rounds.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| mean recall (all heads) | {summary['recall_before']['mean']} | "
        f"{summary['recall_after']['mean']} |",
        f"| lowest head mean | {summary['recall_before']['min']} | "
        f"{summary['recall_after']['min']} |",
        f"| lowest single row | {summary['row_min_recall_before']} | "
        f"{summary['row_min_recall_after']} |",
        f"| heads below target | {summary['heads_below_target_before']} | "
        f"{summary['heads_below_target_after']} |",
        "",
        f"{summary['heads_raised']} heads raised.",
        "",
    ]
    changed = [
        r
        for r in head_rows(result)
        if (r["vertical_after"], r["slash_after"]) != (r["vertical_before"], r["slash_before"])
    ]
    if changed:
        lines += [
            "| layer | head | vertical | slash | recall before | recall after |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['layer']} | {r['head']} | {r['vertical_before']} -> {r['vertical_after']} | "
            f"{r['slash_before']} -> {r['slash_after']} | {r['recall_mean_before']} | "
            f"{r['recall_mean_after']} |"
            for r in changed
        ]
    return "\n".join(lines) + "\n"


def heatmap(result: CalibrationResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("before", result.before.mean), ("after", result.after.mean)]
    low = min(float(torch.nan_to_num(m, nan=1.0).min()) for _, m in panels)
    layers, heads = result.before.mean.shape
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * heads, 1.5 + 0.3 * layers), squeeze=False)
    for ax, (name, mean) in zip(axes[0], panels, strict=True):
        im = ax.imshow(mean.numpy(), vmin=min(low, result.target), vmax=1.0, cmap="viridis")
        ax.set_title(f"recall {name}")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
