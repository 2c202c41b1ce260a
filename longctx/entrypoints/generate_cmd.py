"""`longctx generate`: one prompt in, the generated text streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longctx.engine.outputs import RequestOutput
from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs
from longctx.entrypoints.saved_kv_args import add_load_kv_arg, load_saved_kv
from longctx.errors import LongctxError
from longctx.sampling_params import SamplingParams


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from one prompt",
        description="Generate text from one prompt. The generated text alone goes to stdout, "
        "streamed; logs and the prefill progress bar go to stderr.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k best (0 = off)")
    s.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--no-progress", action="store_true", help="hide the prefill progress bar")
    add_load_kv_arg(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LongctxError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LongctxError(f"cannot read prompt file {path}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from longctx.entrypoints.llm import LLM  # heavy imports only once the flags are valid

    prompt = read_prompt(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(**llm_kwargs(args))
    load_saved_kv(llm, args.load_kv, progress=not args.no_progress)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        run_fn = lambda **kw: llm.chat(messages, params, **kw)
    else:
        run_fn = lambda **kw: llm.generate(prompt, params, **kw)
    run_fn(use_tqdm=not args.no_progress, on_output=_stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _stream(out: RequestOutput) -> None:
    if out.new_text:
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
