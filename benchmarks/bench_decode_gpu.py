"""Decode throughput with and without CUDA graphs, with synchronous and asynchronous scheduling
(issue: serving), 7B-1M shape, random weights. For each, the GPU's busy and idle time per decode
step from CUDA events (longctx.engine.timeline): the idle gap is what asynchronous scheduling
removes.

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
from longctx.engine.timeline import GpuTimeline  # noqa: E402


def decode_run(llm: LLM, batch: int, ctx: int, steps: int, vocab: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, vocab, (ctx,), generator=g).tolist() for _ in range(batch)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    llm.generate(prompts, many)  # warm-up
    t1 = timed(lambda: llm.generate(prompts, one))
    llm.engine.runner.timeline = GpuTimeline()
    tn = timed(lambda: llm.generate(prompts, many))
    gaps = llm.engine.runner.timeline.summary(skip=1)  # step 0 is the prefill
    llm.engine.runner.timeline = None
    return {"tok_s": batch * steps / (tn - t1), **gaps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for eager in (False, True):
        llm = LLM(
            model="qwen2.5-7b-instruct-1m",
            random_weights=True,
            dtype="bfloat16",
            kv_cache_gib=24,
            max_num_seqs=max(batches),
            enforce_eager=eager,
            enable_prefix_caching=False,  # timed prompts may repeat
        )
        vocab = llm.engine.model_config.vocab_size
        for b in batches:
            for asynchronous in (False, True):
                llm.engine.async_scheduling = asynchronous  # between runs: nothing in flight
                r = decode_run(llm, b, args.ctx, args.steps, vocab)
                row = {
                    "decode": "eager" if eager else "cuda graphs",
                    "scheduling": "async" if asynchronous else "sync",
                    "batch": b,
                    "tok_s": r["tok_s"],
                    "gpu_busy_ms_per_step": r["busy_ms"],
                    "gpu_idle_ms_per_step": r["idle_ms"],
                    "idle_fraction": r["idle_ms"] / (r["idle_ms"] + r["busy_ms"]),
                }
                rows.append(row)
                print(row, flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    notes = (
        f"Qwen2.5-7B-Instruct-1M shape (DCA config on), random weights, bf16, Triton backend; "
        f"prompts of {args.ctx} tokens, {args.steps} decode steps, tokens/s over all sequences; "
        "GPU busy/idle per decode step from CUDA events recorded when a step starts being "
        "queued and after its last kernel (idle = next start - this end, as the GPU saw it); "
        "random weights ship no tokenizer, so detokenization (which async also hides) is absent"
    )
    write_results(out_dir(args.out), "decode_gpu", environment(), rows, notes)


if __name__ == "__main__":
    main()
