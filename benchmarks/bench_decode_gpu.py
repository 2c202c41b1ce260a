"""Decode throughput with and without CUDA graphs (issue: serving), 7B-1M shape, random weights.

PYTHONPATH=. python benchmarks/bench_decode_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, timed, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402


def decode_tps(llm: LLM, batch: int, ctx: int, steps: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, vocab, (ctx,), generator=g).tolist() for _ in range(batch)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    llm.generate(prompts, one)  # warm-up
    t1 = timed(lambda: llm.generate(prompts, one))
    tn = timed(lambda: llm.generate(prompts, many))
    return batch * steps / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    results: dict[tuple[str, int], float] = {}
    for eager in (False, True):
        llm = LLM(
            model="qwen2.5-7b-instruct-1m",
            random_weights=True,
            dtype="bfloat16",
            kv_cache_gib=24,
            max_num_seqs=max(batches),
            enforce_eager=eager,
        )
        vocab = llm.engine.model_config.vocab_size
        for b in batches:
            results[("eager" if eager else "graphs", b)] = decode_tps(
                llm, b, args.ctx, args.steps, vocab
            )
            print(
                f"{'eager' if eager else 'graphs'} batch {b}: "
                f"{results[('eager' if eager else 'graphs', b)]:.1f} tok/s",
                flush=True,
            )
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for b in batches:
        g, e = results[("graphs", b)], results[("eager", b)]
        rows.append({"batch": b, "cuda_graphs_tok_s": g, "eager_tok_s": e, "speedup": g / e})
    notes = (
        f"Qwen2.5-7B-Instruct-1M shape (DCA config on), random weights, bf16, Triton backend; "
        f"prompts of {args.ctx} tokens, {args.steps} decode steps, tokens/s over all sequences"
    )
    write_results(out_dir(args.out), "decode_gpu", environment(), rows, notes)


if __name__ == "__main__":
    main()
