"""`longctx eval passkey|niah`: needle retrieval over lengths x depths, as a table and a heatmap.

Every case of one length runs as one greedy batch; progress lines go to stderr; with --out,
results.json is rewritten after every finished case and results.md / heatmap.png after every
length, so a long run that is killed still leaves what it finished (and --resume skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs
from longctx.errors import ConfigError, LongctxError
from longctx.eval import niah, passkey

TASKS = {passkey.NAME: passkey, niah.NAME: niah}
CLAMP_BACKEND = "rope-clamp"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="long-context evaluations (passkey, needle in a haystack)",
        description="Long-context retrieval evaluations on synthetic haystacks of exact token "
        "lengths. Prints an accuracy table (length x depth); --out also writes results.json, "
        "results.md and heatmap.png.",
    )
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, module in TASKS.items():
        t = tasks.add_parser(name, help=module.SUMMARY, description=module.__doc__)
        _add_eval_args(t, module)
        add_engine_args(t)
        t.set_defaults(func=run, task_module=module)


def _add_eval_args(p: argparse.ArgumentParser, module) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--lengths",
        type=parse_lengths,
        default=[4096, 8192],
        help="prompt lengths in tokens, comma-separated; 'k' = 1024 (default: 4096,8192)",
    )
    g.add_argument(
        "--depths",
        type=parse_depths,
        default=[0.1, 0.5, 0.9],
        help="needle depths in [0, 1] (0 = start of the haystack), comma-separated; cases run "
        "in this order (default: 0.1,0.5,0.9)",
    )
    g.add_argument("--samples", type=_positive_int, default=1, help="cases per length and depth")
    g.add_argument("--seed", type=int, default=0, help="seed of keys and filler")
    g.add_argument("--out", type=Path, default=None, help="directory for the result files")
    g.add_argument(
        "--resume",
        action="store_true",
        help="keep the cases already in --out/results.json and run only the missing ones",
    )
    g.add_argument("--max-tokens", type=_positive_int, default=12, help="tokens to generate")
    g.add_argument(
        "--no-chat",
        action="store_true",
        help="raw prompt even if the model has a chat template",
    )
    g.add_argument("--filler-file", type=Path, default=None, help="text to build haystacks from")
    g.add_argument(
        "--needle",
        default=None,
        help=f"needle template with {{number}} (and {{city}} for niah); default: {module.NEEDLE!r}",
    )
    g.add_argument("--question", default=None, help=f"default: {module.QUESTION!r}")
    g.add_argument(
        "--answer-prefix",
        default=None,
        help=f"opens the model's reply; default: {module.ANSWER_PREFIX!r}",
    )
    g.add_argument(
        "--positions-clamp",
        type=_positive_int,
        default=None,
        metavar="N",
        help="baseline without DCA: RoPE position ids min(p, N - 1), as if the model were "
        "trained to N tokens",
    )


def parse_lengths(text: str) -> list[int]:
    try:
        out = [_tokens(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"lengths must be integers like 4096 or 8k: {text!r}"
        ) from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"lengths must be positive: {text!r}")
    return out


def _tokens(x: str) -> int:
    x = x.strip().lower()
    return int(x[:-1]) * 1024 if x.endswith("k") else int(x)


def parse_depths(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths must be numbers in [0, 1]: {text!r}") from None
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1]: {text!r}")
    return out


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def run(args: argparse.Namespace) -> int:
    from longctx.eval.report import format_table, load_results  # heavy: once flags are valid
    from longctx.eval.runner import run_batch

    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out (the directory to resume)")
    task = make_task(args)
    llm = build_llm(args)
    if llm.tokenizer is None:
        raise ConfigError("this checkpoint has no tokenizer, which the evaluations need")
    chat = not args.no_chat and llm.tokenizer.chat_template is not None
    run_info = describe_run(args, llm, chat)
    sink = _Sink(args.out, run_info, load_results(args.out, run_info) if args.resume else [])
    failed = []
    for length in args.lengths:
        cases = pending_cases(args, task, llm.tokenizer, chat, length, sink.done())
        if not cases:
            continue
        try:  # one length failing (say, out of KV cache) leaves the others to run
            run_batch(llm, cases, args.max_tokens, on_result=sink.add)
        except LongctxError as e:
            print(f"longctx: error: length {length}: {e}", file=sys.stderr)
            failed.append(str(length))
        sink.report()
    print(format_table(sink.results))
    if failed:
        raise LongctxError(f"length(s) {', '.join(failed)} failed (see above)")
    return 0


def pending_cases(args: argparse.Namespace, task, tokenizer, chat: bool, length: int, done):
    """The cases of one length, depth by depth in the order given, minus those already done."""
    from longctx.eval.haystack import build_case

    return [
        build_case(task, tokenizer, length=length, depth=d, sample=s, seed=args.seed, chat=chat)
        for d in args.depths
        for s in range(args.samples)
        if (length, d, s) not in done
    ]


class _Sink:
    """Collects results; with an output directory, rewrites results.json after every case and
    the full report after every length."""

    def __init__(self, out: Path | None, run_info: dict[str, Any], earlier: list) -> None:
        self.out, self.run_info, self.results = out, run_info, list(earlier)

    def done(self) -> set[tuple[int, float, int]]:
        return {r.key for r in self.results}

    def add(self, result) -> None:
        from longctx.eval.report import write_json

        self.results.append(result)
        if self.out is not None:
            write_json(self.out, self.run_info, self.results)

    def report(self) -> None:
        from longctx.eval.report import write_report

        if self.out is not None and self.results:
            write_report(self.out, self.run_info, self.results)


def make_task(args: argparse.Namespace):
    filler = None
    if args.filler_file is not None:
        try:
            filler = args.filler_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LongctxError(f"cannot read filler file {args.filler_file}: {e}") from None
    return args.task_module.make_task(
        needle=args.needle,
        question=args.question,
        answer_prefix=args.answer_prefix,
        filler_text=filler,
    )


def build_llm(args: argparse.Namespace):
    """The LLM the flags describe; --positions-clamp swaps in the clamped-RoPE backend with the
    model's trained length set to N. Without --max-model-len the context limit is the longest
    case, also past the trained length (plain RoPE extrapolation is a baseline here)."""
    from longctx.entrypoints.llm import LLM
    from longctx.loading.checkpoint import load_checkpoint

    kwargs = llm_kwargs(args)
    if kwargs.pop("random_weights", False):
        raise ConfigError("evaluations need trained weights, not --random-weights")
    clamp = args.positions_clamp
    if clamp is not None and (
        kwargs["dca"] or args.attention_backend not in ("auto", CLAMP_BACKEND)
    ):
        raise ConfigError(
            "--positions-clamp is a baseline without DCA: drop the DCA and backend flags"
        )
    ckpt = load_checkpoint(kwargs.pop("model"))
    if clamp is not None:
        config = dataclasses.replace(ckpt.config, max_position_embeddings=clamp)
        ckpt = dataclasses.replace(ckpt, config=config)
        kwargs["attention_backend"] = CLAMP_BACKEND
    longest = max(args.lengths) + args.max_tokens
    kwargs["max_model_len"] = args.max_model_len or longest
    trained = ckpt.config.max_position_embeddings
    if kwargs["dca"] is None and ckpt.config.dca is None and clamp is None and longest > trained:
        print(
            f"note: {longest} tokens is past the trained {trained} and DCA is off: "
            "plain RoPE extrapolation",
            file=sys.stderr,
        )
    # Each case on its own: the depths of one length share the haystack before the needle, and
    # a cached prefix would shorten the TTFT measured (and, sparse, reuse another case's picks).
    kwargs["enable_prefix_caching"] = False
    return LLM(checkpoint=ckpt, **kwargs)


def describe_run(args: argparse.Namespace, llm, chat: bool) -> dict[str, Any]:
    """The run's settings as stored in results.json (resuming checks them)."""
    import torch

    dca = llm.engine.model_config.dca
    backend = type(llm.engine.runner.backend).__name__
    return {
        "task": args.task,
        "label": _label(dca, args.positions_clamp, llm.engine.model_config.max_position_embeddings),
        "model": str(llm.engine.checkpoint.source),
        "dca": dataclasses.asdict(dca) if dca is not None else None,
        "positions_clamp": args.positions_clamp,
        "attention_backend": backend,
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "chat_template": chat,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "needle": args.needle,
        "question": args.question,
        "answer_prefix": args.answer_prefix,
        "filler_file": str(args.filler_file) if args.filler_file else None,
        "max_num_batched_tokens": llm.engine.max_num_batched_tokens,
        "lengths": args.lengths,
        "depths": args.depths,
        "samples": args.samples,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {
            "device": str(llm.engine.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }


def _label(dca, clamp: int | None, trained: int) -> str:
    if dca is not None:
        return (
            f"DCA chunk {dca.chunk_size} / local {dca.local_size}, "
            f"YaRN from {dca.original_max_position_embeddings}"
        )
    if clamp is not None:
        return f"no DCA, RoPE positions clamped at {clamp}"
    return f"no DCA, plain RoPE (trained to {trained})"
