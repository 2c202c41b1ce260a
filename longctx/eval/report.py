"""Tables, results.json, results.md and the NIAH heatmap of an evaluation run.

An output directory holds one run: `results.json` (the run's settings under "run", every case
under "cases"), `results.md` (accuracy table, settings, cases) and `heatmap.png` (length on x,
depth on y, colour = accuracy). Everything is rewritten from the full list of results each time,
so a killed run leaves a consistent directory with the cases it finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.eval.runner import CaseResult

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
HEATMAP_PNG = "heatmap.png"

Cell = tuple[int, int]  # (correct, total)


def accuracy_grid(
    results: Sequence[CaseResult],
) -> tuple[list[int], list[float], dict[tuple[int, float], Cell]]:
    """Sorted lengths, sorted depths and (correct, total) per (length, depth) present."""
    cells: dict[tuple[int, float], Cell] = {}
    for r in results:
        ok, n = cells.get((r.length, r.depth), (0, 0))
        cells[(r.length, r.depth)] = (ok + r.correct, n + 1)
    lengths = sorted({r.length for r in results})
    depths = sorted({r.depth for r in results})
    return lengths, depths, cells


def format_table(results: Sequence[CaseResult]) -> str:
    """Markdown table: a row per depth, a column per length, cells 'accuracy (correct/total)'."""
    lengths, depths, cells = accuracy_grid(results)
    head = "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    rows = [
        f"| {d:g} | " + " | ".join(_cell(cells.get((n, d))) for n in lengths) + " |" for d in depths
    ]
    ok = sum(r.correct for r in results)
    total = f"| all | {ok}/{len(results)} = {ok / len(results):.2f} |" if results else ""
    return "\n".join([head, rule, *rows, total]).rstrip()


def _cell(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    ok, n = cell
    return f"{ok / n:.2f} ({ok}/{n})"


def write_report(out_dir: Path, run: dict[str, Any], results: Sequence[CaseResult]) -> None:
    """Write results.json, results.md and heatmap.png into out_dir (created if needed)."""
    write_json(out_dir, run, results)
    _atomic_write(out_dir / RESULTS_MD, markdown(run, results))
    if results:
        heatmap(out_dir / HEATMAP_PNG, results, title=f"{run['task']}\n{run['label']}")


def write_json(out_dir: Path, run: dict[str, Any], results: Sequence[CaseResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"run": run, "cases": [r.to_dict() for r in _sorted(results)]}
    _atomic_write(out_dir / RESULTS_JSON, json.dumps(doc, indent=1) + "\n")


def load_results(out_dir: Path, run: dict[str, Any]) -> list[CaseResult]:
    """The cases already in out_dir's results.json, for resuming; none if there is no file.
    Refuses results of other settings (only the lengths / depths / samples lists may differ)."""
    path = out_dir / RESULTS_JSON
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text("utf-8"))
        old = {k: v for k, v in doc["run"].items() if k not in _RUN_EXTENTS}
        cases = [CaseResult(**c) for c in doc["cases"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LongctxError(f"cannot resume from {path}: {e}") from None
    new = {k: v for k, v in run.items() if k not in _RUN_EXTENTS}
    if old != new:
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise LongctxError(f"cannot resume from {path}: it has other settings ({', '.join(diff)})")
    return cases


# Settings that may change between a run and its resumption (cases are keyed by them).
_RUN_EXTENTS = ("lengths", "depths", "samples", "started", "environment")


def markdown(run: dict[str, Any], results: Sequence[CaseResult]) -> str:
    lines = [
        f"# {run['task']}: {run['label']}",
        "",
        "Accuracy (exact match of the number), a row per needle depth, a column per prompt "
        "length in tokens:",
        "",
        format_table(results),
        "",
        "## Settings",
        "",
        *(f"- {k}: `{json.dumps(v)}`" for k, v in run.items()),
        "",
        "## Cases",
        "",
        "| length | depth | sample | expected | output | correct | prompt tokens | seconds |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.length} | {r.depth:g} | {r.sample} | {r.expected} | "
            f"{_md_escape(r.output)} | {'yes' if r.correct else 'no'} | {r.prompt_tokens} | "
            f"{r.seconds:.1f} |"
            for r in _sorted(results)
        ),
    ]
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return "`" + " ".join(text.split()).replace("|", "\\|").replace("`", "'") + "`"


def heatmap(path: Path, results: Sequence[CaseResult], title: str) -> None:
    """The familiar NIAH picture: length on x, depth on y (0 at the top), red (0) to green (1),
    each cell annotated with its accuracy and count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths, cells = accuracy_grid(results)
    acc = np.full((len(depths), len(lengths)), np.nan)
    for (n, d), (ok, total) in cells.items():
        acc[depths.index(d), lengths.index(n)] = ok / total
    fig, ax = plt.subplots(figsize=(max(4.8, 1.8 + 1.1 * len(lengths)), 1.8 + 0.5 * len(depths)))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for (n, d), (ok, total) in cells.items():
        y, x = depths.index(d), lengths.index(n)
        ax.text(x, y, f"{ok / total:.2f}\n{ok}/{total}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _sorted(results: Sequence[CaseResult]) -> list[CaseResult]:
    return sorted(results, key=lambda r: r.key)


def _atomic_write(path: Path, text: str) -> None:
    # A run killed mid-write must not leave half a file where the last good one was.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
