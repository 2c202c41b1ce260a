"""Where a decode step's time goes: torch.profiler over a few engine steps of the 7B-1M shape
(random weights). Diagnostic, not a benchmark of record.

  PYTHONPATH=. python benchmarks/profile_decode_gpu.py [--batch 1] [--ctx 1024]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from longctx import LLM, SamplingParams  # noqa: E402
from longctx.loading import builtin_config  # noqa: E402
from longctx.loading.checkpoint import Checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    cfg = builtin_config("qwen2.5-7b-instruct-1m").with_dca(None)
    llm = LLM(
        checkpoint=Checkpoint(cfg, None, "random", None),
        dtype="bfloat16",
        attention_backend=args.backend,
        kv_cache_gib=8,
        enable_prefix_caching=False,
    )
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for _ in range(args.batch):
        eng.add_request(torch.randint(0, cfg.vocab_size, (args.ctx,), generator=g).tolist(), params)
    for _ in range(4):  # prefill + warm decode
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        eng.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
    print(
        f"decode step: {step_ms:.2f} ms at batch {args.batch} "
        f"({args.batch / step_ms * 1e3:.1f} tok/s)"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
