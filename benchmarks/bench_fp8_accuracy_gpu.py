"""Is the fp8 KV cache accurate enough to be the default? (issue 13, part 3) On the GPU, real
weights (the default model, Qwen2.5-Coder-0.5B-Instruct GGUF), bf16 compute, Triton backend.

  PYTHONPATH=/root/site:. python3 benchmarks/bench_fp8_accuracy_gpu.py \
      --model /root/longctx-model/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out $OUT
  PYTHONPATH=. python benchmarks/bench_fp8_accuracy_gpu.py --tiny      # CPU smoke test

Two parts, one call:
  greedy   kv_cache_dtype="fp8" against "auto" (a bf16 cache) on three 2K-token prompts (the
           first tokens of repository files), 32 greedy tokens each; the logits of every
           prompt position and of the agreeing greedy steps compared (bench_fp8_kv_cpu.py's
           measures). Bar: >= 30/32 greedy tokens equal on each prompt.
  passkey  the fp8 cache at 128K / 256K / 512K / 1M tokens, depths 0.1 / 0.5 / 0.9, with the
           real-weights recipe of the sparse e2e benchmark (DCA chunk 32768 / local 8192, YaRN
           from 32768, sparse prefill with the default budgets, chat template, greedy). Bar:
           every case retrieves the key.
Writes fp8_accuracy_gpu_greedy and fp8_accuracy_gpu_passkey (.md / .json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.bench_e2e_sparse_gpu import DCA_05B, case, release, run_case, warm_up  # noqa: E402
from benchmarks.bench_fp8_kv_cpu import FILES, LogitRecorder, compare, run  # noqa: E402
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, DCAConfig  # noqa: E402
from longctx.eval import passkey  # noqa: E402
from longctx.sparse.config import SparseConfig  # noqa: E402

K = 1024
GREEDY_BAR = 30  # of 32


def part_greedy(args) -> list[dict]:
    kw = dict(model=args.model, kv_cache_gib=2.0, enable_prefix_caching=False)
    if args.tiny:
        kw |= dict(device="cpu", dtype="float32")
    engines = {dtype: LLM(kv_cache_dtype=dtype, **kw) for dtype in ("auto", "fp8")}
    recs = {dtype: LogitRecorder(llm) for dtype, llm in engines.items()}
    tok = engines["auto"].tokenizer
    rows = []
    for name in FILES:
        ids = tok.encode(Path(name).read_text(encoding="utf-8"))[: args.tokens]
        a = run(engines["auto"], recs["auto"], ids, args.steps)
        b = run(engines["fp8"], recs["fp8"], ids, args.steps)
        row = dict(prompt=f"{name} ({len(ids)} tokens)", **compare(ids, a, b))
        equal = int(row["greedy_tokens_equal"].split("/")[0])
        row["meets_bar"] = equal >= GREEDY_BAR * args.steps // 32
        rows.append(row)
        print(row, flush=True)
    for llm in engines.values():
        release(llm)
    return rows


def part_passkey(args) -> list[dict]:
    dca = DCA_05B
    if args.tiny:
        dca = DCAConfig(chunk_size=2048, local_size=512, original_max_position_embeddings=2048)
    llm = LLM(
        model=args.model, dca=dca, kv_cache_dtype="fp8", kv_cache_gib=args.kv_gib,
        sparse=SparseConfig(source="default", threshold=args.threshold),
        enable_prefix_caching=False,  # the depths of one length share the haystack
        **(dict(device="cpu", dtype="float32") if args.tiny else {}),
    )  # fmt: skip
    warm_up(llm, args.warm)
    rows = []
    for length in [int(x) * K for x in args.lengths.split(",")]:
        for depth in [float(x) for x in args.depths.split(",")]:
            rows.append(dict(kv_cache="fp8", **run_case(llm, case(passkey, llm, length, depth))))
            print(rows[-1], flush=True)
            args.flush("passkey", rows)  # a call cut short keeps the cases done
    release(llm)
    right = sum(r["correct"] for r in rows)
    rows.append(dict(kv_cache="fp8", task="total", correct=f"{right}/{len(rows)}"))
    return rows


NOTES = {
    "greedy": "Real default model (Qwen2.5-Coder-0.5B-Instruct GGUF), bf16 compute, Triton "
    "backend: kv_cache_dtype='fp8' (e4m3, float32 scale per token and kv head, keys relative "
    "to per-layer, kv-head and channel zero points) against 'auto' (a bf16 cache); logits of "
    "every prompt position and of the greedy steps whose context agrees (the first differing "
    "one included). meets_bar: >= 30/32 greedy tokens equal.",
    "passkey": "Real default model, bf16, fp8 KV cache, DCA chunk 32768 / local 8192 with YaRN "
    "from 32768, sparse prefill with the default budgets (threshold 32768), chat template, "
    "greedy, one passkey case per length and depth (kernels compiled by a warm-up prompt). "
    "ttft_s: the engine's prefill time of the case. K = 1024 tokens (1000K = 1,024,000).",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF / HF directory (default: the default)")
    ap.add_argument("--parts", default="greedy,passkey")
    ap.add_argument("--tokens", type=int, default=2048, help="greedy prompts' length")
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens generated")
    ap.add_argument("--lengths", default="128,256,512,1000", help="passkey, in K tokens")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--kv-gib", type=float, default=14.0)
    ap.add_argument("--warm", type=int, default=65536, help="warm-up prompt tokens")
    ap.add_argument("--threshold", type=int, default=32768, help="sparse threshold")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at tiny sizes")
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.steps, args.lengths, args.depths = 256, 8, "3", "0.5"
        args.warm, args.threshold, args.kv_gib = 1024, 1024, 0.25
    env = environment()
    t0 = time.perf_counter()
    out = out_dir(args.out)

    def flush(part: str, rows: list[dict]) -> None:
        wall = env | {"wall_s": round(time.perf_counter() - t0)}
        write_results(out, f"fp8_accuracy_gpu_{part}", wall, rows, NOTES[part], quiet=True)

    args.flush = flush
    for part in args.parts.split(","):
        rows = part_greedy(args) if part == "greedy" else part_passkey(args)
        flush(part, rows)
        print((out / f"fp8_accuracy_gpu_{part}.md").read_text(), flush=True)
    if torch.cuda.is_available():
        print(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
