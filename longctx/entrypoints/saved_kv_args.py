"""`--load-kv DIR` of generate and serve: saved KV (`longctx prefill --save-kv`) put into the
prefix cache before the first request."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longctx.entrypoints.llm import LLM


def add_load_kv_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--load-kv",
        action="append",
        default=[],
        metavar="DIR",
        help="put KV saved by `longctx prefill --save-kv DIR` into the prefix cache first: "
        "prompts that start with that document skip its prefill (repeatable)",
    )


def load_saved_kv(llm: LLM, directories: list[str], progress: bool) -> None:
    for directory in directories:
        start = time.perf_counter()
        info = llm.load_kv(directory, use_tqdm=progress)
        print(
            f"longctx: loaded KV of {info.num_tokens} tokens from {directory} "
            f"({info.num_bytes / 2**20:.1f} MiB) in {time.perf_counter() - start:.2f} s",
            file=sys.stderr,
        )
