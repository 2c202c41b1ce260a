"""Shared by the benchmark scripts: environment facts and result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def environment() -> dict:
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def out_dir(arg: str | None) -> Path:
    path = Path(arg or os.environ.get("OUT") or "benchmarks/results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn(), synchronising the GPU around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def write_results(
    directory: Path, name: str, env: dict, rows: list[dict], notes: str = "", quiet: bool = False
) -> None:
    (directory / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [f"# {name}", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    if notes:
        lines += [notes, ""]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    (directory / f"{name}.md").write_text(text)
    if not quiet:
        print(text)


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
