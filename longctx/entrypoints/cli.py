"""`longctx` command line: subcommands share one error policy — a one-line message naming the
problem on stderr and a non-zero exit code, never a traceback, for anything the user can fix."""

from __future__ import annotations

import argparse
import logging
import sys

from longctx.entrypoints import (
    calibrate_cmd,
    eval_cmd,
    fetch_cmd,
    generate_cmd,
    prefill_cmd,
    serve_cmd,
)
from longctx.errors import LongctxError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longctx",
        description="Long-context LLM inference (Qwen2 architecture, 128K-1M tokens): Dual Chunk "
        "Attention, chunked prefill over a paged KV cache.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _subcommands():
        module.add_parser(sub)
    return p


def _subcommands() -> list:
    return [generate_cmd, serve_cmd, eval_cmd, calibrate_cmd, fetch_cmd, prefill_cmd]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LongctxError as e:
        print(f"longctx: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
