"""The Qwen2.5-14B-Instruct-1M architecture (48 layers, 40 q / 8 kv heads, d = 128; random
weights) with a 1M-token prompt on ONE GPU, through the engine as a user runs it: bf16 weights
(~29.5 GB), an fp8 KV cache (e4m3 + scales, keys relative to zero points: 101.4 GiB for
1,024,000 tokens, against 187.5 GiB in bf16), DCA from the model's config, chunked prefill.

  PYTHONPATH=. python benchmarks/bench_14b_1m_gpu.py --out $OUT          # one H200 (141 GB)
  PYTHONPATH=. python benchmarks/bench_14b_1m_gpu.py --smoke              # CPU: a 2-layer copy

Measures, for each --lengths prompt (random token ids, one greedy token): TTFT, and
torch.cuda memory: weights, KV cache (values, scales, zero points), peak. Dense attention of
the 14B shape at 1M tokens takes longer than the device tool's 10-minute call (the 7B needs
~455 s): give a shorter --lengths list, or --sparse (the default budgets), to stay inside
one call. Writes
bench_14b_1m_gpu.md / .json (rewritten after every prompt, so a run cut by the time limit
keeps what it measured); prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402
from longctx.engine.kv_cache import kv_bytes_per_token, kv_cache_bytes  # noqa: E402
from longctx.loading import builtin_config  # noqa: E402
from longctx.loading.checkpoint import Checkpoint  # noqa: E402
from longctx.sparse.config import SparseConfig  # noqa: E402

MODEL = "qwen2.5-14b-instruct-1m"
GIB = 2**30


def build(smoke: bool, max_len: int, chunk: int, sparse: bool) -> LLM:
    cfg = builtin_config(MODEL)
    kw: dict = dict(
        dtype="bfloat16",
        kv_cache_dtype="fp8",
        max_model_len=max_len + 16,
        max_num_batched_tokens=chunk,
        max_num_seqs=1,
        enable_prefix_caching=False,
        # Random weights attend near-randomly, so the selections mean nothing; the default
        # budgets still bound the kernel's tiles as they do on real weights.
        sparse=SparseConfig(source="default", threshold=256 if smoke else 32768)
        if sparse
        else False,
    )
    if smoke:  # the 14B layout of one layer's heads, 2 layers, a small vocabulary
        cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=512, intermediate_size=256)
        kw.update(device="cpu", kv_cache_gib=0.05)
    else:
        # the cache for the prompt and no more: what is left is the activations' headroom
        kw["kv_cache_gib"] = kv_bytes_per_token(cfg, torch.float8_e4m3fn) * (max_len + 64) / GIB
    return LLM(checkpoint=Checkpoint(cfg, None, f"random:{MODEL}", None), **kw)


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_one(llm: LLM, n: int) -> dict:
    """One prefill (the whole prompt, chunked) and the first token: TTFT as a user sees it."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, llm.engine.model_config.vocab_size, (n,), generator=torch.Generator())
    t0 = time.perf_counter()
    out = llm.generate([ids.tolist()], SamplingParams(max_tokens=1, temperature=0))[0]
    ttft = time.perf_counter() - t0
    return dict(
        prompt_tokens=n,
        ttft_s=round(ttft, 2),
        tokens=len(out.token_ids),
        peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="131072,1000000")
    ap.add_argument(
        "--chunk", type=int, default=32768, help="prefill chunk (max_num_batched_tokens)"
    )
    ap.add_argument("--sparse", action="store_true", help="sparse prefill, default budgets")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer copy on the CPU")
    args = ap.parse_args()
    lengths = [300, 700] if args.smoke else [int(x) for x in args.lengths.split(",")]
    chunk = 256 if args.smoke else args.chunk
    env = environment()
    llm = build(args.smoke, max(lengths), chunk, args.sparse)
    runner = llm.engine.runner
    cfg = llm.engine.model_config
    info = dict(
        model=MODEL if not args.smoke else f"{MODEL} (2-layer smoke copy)",
        layers=cfg.num_layers,
        heads=f"{cfg.num_heads} q / {cfg.num_kv_heads} kv, d={cfg.head_dim}",
        dca=str(cfg.dca),
        prefill="sparse (default budgets)" if args.sparse else "dense",
        weights_gib=round(weight_bytes(runner.model) / GIB, 2),
        kv_cache_gib=round(kv_cache_bytes(runner.kv_caches) / GIB, 2),
        kv_capacity_tokens=runner.kv_capacity_tokens,
        bf16_cache_for_the_longest_prompt_gib=round(
            kv_bytes_per_token(cfg, torch.bfloat16) * max(lengths) / GIB, 1
        ),
    )
    if torch.cuda.is_available():
        info["device_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        info["allocated_after_start_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    rows: list[dict] = []
    notes = "; ".join(f"{k}={v}" for k, v in info.items())
    for n in lengths:
        rows.append(run_one(llm, n))
        print(rows[-1], flush=True)
        write_results(out_dir(args.out), "bench_14b_1m_gpu", env, rows, notes)
        gc.collect()
    print(notes)
    print(f"{'tokens':>10} {'TTFT s':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['prompt_tokens']:>10} {r['ttft_s']:>8} {r['peak_gib']!s:>9}")


if __name__ == "__main__":
    main()
