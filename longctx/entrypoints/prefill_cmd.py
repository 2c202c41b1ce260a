"""`longctx prefill`: prefill a document once and save its KV (longctx/engine/saved_kv.py), for
`generate --load-kv` / `serve --load-kv` to answer questions about it without the prefill."""

from __future__ import annotations

import argparse
import sys
import time

from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs
from longctx.entrypoints.generate_cmd import read_prompt


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prefill",
        help="prefill a document and save its KV cache to a directory",
        description="Prefill a prompt (a document) and write the KV of its full cache blocks to "
        "DIR (safetensors shards and a manifest). `generate --load-kv DIR` and `serve --load-kv "
        "DIR` then answer prompts that start with the document without prefilling it again. The "
        "loading engine must run the same model with the same dtype, KV dtype, block size, DCA "
        "and sparse settings.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the document text")
    src.add_argument("--prompt-file", help="read the document from this file ('-' for stdin)")
    p.add_argument("--save-kv", required=True, metavar="DIR", help="directory to write")
    p.add_argument(
        "--shard-mib",
        type=int,
        default=256,
        help="largest shard file in MiB; saving holds a few shards in memory (default: 256)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longctx.entrypoints.llm import LLM  # heavy imports only once the flags are valid
    from longctx.errors import ConfigError

    if args.shard_mib <= 0:
        raise ConfigError(f"--shard-mib must be positive, got {args.shard_mib}")
    if args.no_prefix_caching:
        raise ConfigError("--save-kv needs prefix caching: drop --no-prefix-caching")
    prompt = read_prompt(args)
    llm = LLM(**llm_kwargs(args))
    start = time.perf_counter()
    info = llm.save_kv(
        prompt, args.save_kv, use_tqdm=not args.no_progress, shard_bytes=args.shard_mib * 2**20
    )
    print(
        f"longctx: saved KV of {info.num_tokens} tokens ({info.num_blocks} blocks, "
        f"{info.num_bytes / 2**20:.1f} MiB) to {args.save_kv} in "
        f"{time.perf_counter() - start:.2f} s",
        file=sys.stderr,
    )
    return 0
