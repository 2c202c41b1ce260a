"""Pipeline-parallel prefill (issue 14): TTFT of the Qwen2.5-7B-Instruct-1M architecture with
random weights at 256K / 512K / 1M tokens on two GPUs, with fixed prefill chunks and with DCPP
(equal modelled cost per chunk), beside the one-GPU TTFT measured in the same call; per-stage
busy time and the bubble fraction of each pipelined prefill.

  PYTHONPATH=. python benchmarks/bench_pp_gpu.py --out $OUT            # two GPUs (H200 x2)
  PYTHONPATH=. python benchmarks/bench_pp_gpu.py --model qwen2.5-14b-instruct-1m \\
      --lengths 1048576 --no-single --out $OUT                          # 14B at 1M, bf16 KV
  PYTHONPATH=. python benchmarks/bench_pp_gpu.py --cpu-smoke           # CPU, gloo, tiny model

Busy time of a stage: its compute spans (CUDA events around each micro-batch; host time on the
CPU), stage 0's including the LM head and sampling. Bubble fraction of a stage: 1 - busy / TTFT;
the table's `bubble` is the mean over the stages. Targets (issue 14): bubble < 10% with DCPP,
two GPUs <= 0.6x one GPU's TTFT at 512K.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402
from longctx.engine.dcpp import ChunkCostModel, plan_chunks  # noqa: E402
from longctx.errors import LongctxError  # noqa: E402

GPU_LENGTHS = (262_144, 524_288, 1_048_576)
CPU_LENGTHS = (1024, 2048, 4096)
TINY = dict(  # the CPU smoke model: 4 layers, GQA 4/2
    architectures=["Qwen2ForCausalLM"],
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=65536,
    rope_theta=1e6,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-7b-instruct-1m", help="built-in config or path")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens (32768)")
    p.add_argument("--policies", nargs="+", default=["fixed", "dcpp"], choices=["fixed", "dcpp"])
    p.add_argument("--no-single", action="store_true", help="skip the one-GPU baseline")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (gloo)")
    p.add_argument("--out", default=None)
    return p.parse_args()


def build(args, model: str, stages: int, policy: str, max_len: int) -> LLM:
    kw = dict(
        random_weights=True,
        max_model_len=max_len,
        max_num_batched_tokens=args.chunk,
        kv_cache_dtype=args.kv_cache_dtype,
        sparse=False,
        pipeline_parallel_size=stages,
        pipeline_chunking=policy,
    )
    if args.cpu_smoke:
        kw.update(device="cpu", dtype="float32", block_size=64, kv_cache_gib=0.25)
    return LLM(model, **kw)


def release(llm: LLM) -> None:
    close = getattr(llm.engine, "close", None)
    if close is not None:
        close()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def chunk_plan(llm: LLM, policy: str, length: int, chunk: int) -> tuple[int, float]:
    """(number of prefill chunks, dearest / cheapest modelled chunk cost)."""
    cost = ChunkCostModel.of(llm.engine.model_config)
    if policy == "dcpp":
        chunks = plan_chunks(length, cost, chunk, llm.engine.block_size)
    else:
        chunks = (chunk,) * (length // chunk) + ((length % chunk,) if length % chunk else ())
    costs, pos = [], 0
    for n in chunks:
        costs.append(cost.cost(pos, n))
        pos += n
    return len(chunks), max(costs) / min(costs)


def measure(llm: LLM, length: int, setup: str, policy: str | None) -> dict:
    engine = llm.engine
    ids = prompt(length, engine.model_config.vocab_size, seed=length)
    pipelined = hasattr(engine, "busy_times")
    if pipelined:
        engine.busy_times()  # start from zero
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([ids], params)
    ttft = time.perf_counter() - start
    row = {"setup": setup, "tokens": length, "ttft_s": round(ttft, 3)}
    chunk = engine.max_num_batched_tokens
    count, spread = chunk_plan(llm, policy or "fixed", length, chunk)
    row.update(chunks=count, chunk_cost_spread=round(spread, 2))
    if pipelined:
        busy = [t.seconds for t in engine.busy_times()]
        bubbles = [1 - b / ttft for b in busy]
        row["busy_s"] = " / ".join(f"{b:.3f}" for b in busy)
        row["bubble_per_stage"] = " / ".join(f"{x:.3f}" for x in bubbles)
        row["bubble"] = round(sum(bubbles) / len(bubbles), 3)
    return row


def run_setup(args, model: str, lengths, stages: int, policy: str | None) -> list[dict]:
    name = "1 device" if stages == 1 else f"{stages} stages, {policy}"
    try:
        llm = build(args, model, stages, policy or "fixed", max(lengths) + 16)
    except LongctxError as e:
        return [{"setup": name, "tokens": n, "ttft_s": f"not run: {e}"} for n in lengths]
    rows = []
    try:
        llm.generate(
            [prompt(2 * llm.engine.max_num_batched_tokens, 100, 0)], SamplingParams(max_tokens=1)
        )
        for n in lengths:
            try:
                rows.append(measure(llm, n, name, policy))
            except LongctxError as e:
                rows.append({"setup": name, "tokens": n, "ttft_s": f"not run: {e}"})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        release(llm)
    return rows


def add_ratios(rows: list[dict]) -> None:
    single = {r["tokens"]: r["ttft_s"] for r in rows if r["setup"] == "1 device"}
    for r in rows:
        base = single.get(r["tokens"])
        if isinstance(base, float) and isinstance(r["ttft_s"], float):
            r["vs_1_device"] = round(r["ttft_s"] / base, 3)


def main() -> None:
    args = parse_args()
    model = args.model
    if args.cpu_smoke:
        tmp = Path(tempfile.mkdtemp(prefix="pp-smoke-"))
        (tmp / "config.json").write_text(json.dumps(TINY))
        model = str(tmp)
        args.chunk = args.chunk or 256
        # One "device" is a stage's share of the cores (workers get the same share).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.stages))
    lengths = args.lengths or (CPU_LENGTHS if args.cpu_smoke else GPU_LENGTHS)
    rows: list[dict] = []
    if not args.no_single:
        rows += run_setup(args, model, lengths, 1, None)
    for policy in args.policies:
        rows += run_setup(args, model, lengths, args.stages, policy)
    add_ratios(rows)
    env = environment()
    if args.cpu_smoke:
        env["device"] = f"CPU ({args.stages} gloo processes)"
        notes = (
            "CPU SMOKE RUN (tiny random model, gloo, each process cores/stages threads, on a "
            "shared machine): shows that the script and the pipeline run; these are not GPU "
            "figures and say nothing about GPU speed."
        )
        name = "pp_cpu_smoke"
    else:
        env["gpus"] = torch.cuda.device_count()
        notes = f"model {args.model} (random weights), dense prefill, kv {args.kv_cache_dtype}"
        name = "pp_gpu"
    write_results(out_dir(args.out), name, env, rows, notes)


if __name__ == "__main__":
    main()
