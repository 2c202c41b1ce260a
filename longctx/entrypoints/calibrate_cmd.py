"""`longctx calibrate`: refine per-head sparse budgets on long sequences (sparsity refinement).

Prefills the calibration sequences with sparse attention, measures each head's attention recall
exp(lse_sparse - lse_full), raises the budgets of heads under --recall (x --step per round, up
to --max-budget) and writes the refined pattern file plus a report (report.json, report.md,
recall_heatmap.png). Method and choices: longctx/sparse/calibrate.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longctx.entrypoints.engine_args import add_engine_args, llm_kwargs
from longctx.errors import ConfigError

MAX_BUDGET_FACTOR = 8  # default caps: this many times the starting budgets


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="refine sparse-attention budgets per head on long sequences",
        description="Measure per-layer, per-head attention recall of sparse prefill on "
        "calibration sequences and raise the vertical/slash budgets of heads below --recall. "
        "Starts from --sparse-config (default budgets if none). Writes --out (MInference "
        "format) and a report beside it.",
    )
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE",
        help="text files (tokens repeated up to each length), or 'synthetic' (random tokens "
        "with repeated spans)",
    )
    g.add_argument(
        "--lengths",
        type=parse_lengths,
        default=[16384],
        help="sequence lengths in tokens, comma-separated; 'k' = 1024 (default: 16384)",
    )
    g.add_argument("--recall", type=float, default=0.95, help="target mean recall per head")
    g.add_argument("--out", required=True, help="refined sparse_attention_config.json to write")
    g.add_argument(
        "--max-budget",
        type=parse_budget,
        default=None,
        metavar="V,S",
        help=f"caps on vertical and slash sizes (default: {MAX_BUDGET_FACTOR}x the start)",
    )
    g.add_argument("--step", type=float, default=1.5, help="budget factor per round (> 1)")
    g.add_argument("--rounds", type=int, default=6, help="raising rounds at most")
    g.add_argument(
        "--report-dir",
        default=None,
        help="where report.json / report.md / recall_heatmap.png go (default: beside --out)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    add_engine_args(p)
    p.set_defaults(func=run)


def parse_lengths(text: str) -> list[int]:
    try:
        values = [
            int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x)
            for x in text.split(",")
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"lengths must be >= 2, got {text!r}")
    return values


def parse_budget(text: str) -> tuple[int, int]:
    try:
        v, s = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-budget wants V,S, got {text!r}") from None
    if v < 0 or s < 0:
        raise argparse.ArgumentTypeError("budgets must be >= 0")
    return v, s


def run(args: argparse.Namespace) -> int:
    from longctx.entrypoints.llm import LLM  # heavy imports only once the flags are valid
    from longctx.sampling_params import SamplingParams
    from longctx.sparse import calibrate as cal
    from longctx.sparse.config import SparseConfig

    if args.step <= 1.0 or not 0.0 < args.recall <= 1.0:
        raise ConfigError("--step must be > 1 and --recall in (0, 1]")
    kwargs = llm_kwargs(args)
    if kwargs["pipeline_parallel_size"] > 1:
        raise ConfigError("calibrate runs on one device: drop --pipeline-parallel-size")
    start = kwargs.pop("sparse")
    if start is False:
        raise ConfigError("--no-sparse makes no sense for calibrate")
    kwargs["enable_prefix_caching"] = False  # the recorder must see every row of every prompt
    llm = LLM(**kwargs, sparse=False)
    model = llm.engine.model_config
    start = (start or SparseConfig()).materialize(model.num_layers, model.num_heads)
    tok = llm.tokenizer
    seqs = cal.calibration_sequences(
        args.data,
        args.lengths,
        encode=tok.encode if tok is not None else None,
        vocab_size=model.vocab_size,
        seed=args.seed,
    )
    for ids in seqs:
        llm.engine.check_fits(len(ids), SamplingParams(max_tokens=1))
    vmax, smax = args.max_budget or (
        MAX_BUDGET_FACTOR * max(p.vertical for heads in start.layers for p in heads),
        MAX_BUDGET_FACTOR * max(p.slash for heads in start.layers for p in heads),
    )
    result = cal.calibrate(
        cal.engine_measure(llm, seqs),
        start,
        target=args.recall,
        step=args.step,
        max_vertical=vmax,
        max_slash=smax,
        max_rounds=args.rounds,
        on_round=lambda r, rnd: _log_round(r, rnd, args.recall),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.config.save(out)
    report = Path(args.report_dir) if args.report_dir else out.parent / f"{out.stem}_report"
    cal.write_report(result, report)
    print(out)
    print(f"report: {report}", file=sys.stderr)
    return 0


def _log_round(index: int, rnd, target: float) -> None:
    mean = rnd.mean[rnd.mean == rnd.mean]  # drop NaN (layers never measured)
    below = int((rnd.mean < target).sum())
    print(
        f"[calibrate] round {index}: mean recall {float(mean.mean()):.4f}, lowest head "
        f"{float(mean.min()):.4f}, {below} heads below {target}",
        file=sys.stderr,
    )
