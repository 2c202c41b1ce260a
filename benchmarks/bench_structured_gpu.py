"""Structured output and n > 1 at serving batch sizes.

1. Decode tokens/s at batch B (32) with a JSON Schema on every sequence vs the same batch
   unconstrained (target >= 0.95x: the mask is filled on the host while the device runs the
   step's forward pass). Both generate exactly --max-tokens per sequence (ignore_eos); the
   schema (an array of at least 1000 records) keeps every sequence inside the grammar
   throughout.
2. n = 8 on a long prompt: time until all 8 have their first token vs a single request's, and
   the most KV blocks held: one prompt, plus per extra sequence its continuation and a copy of
   the last prompt block (which it rewrites: it computes the last prompt token itself).
   On the CPU at tiny sizes the one decode step of 8 rows that follows the shared prefill
   costs as much as the prefill itself; the ratio means something at long prompts.

Weights do not change speed: --random-weights draws them for the default model's shape (or
--tiny's), keeping the default model's tokenizer, which the grammar needs.

  .venv/bin/python benchmarks/bench_structured_gpu.py                 # CUDA, 0.5B shape, 128K
  .venv/bin/python benchmarks/bench_structured_gpu.py --tiny --device cpu --batch 4 \
      --max-tokens 24 --prompt-len 1024 --name structured_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402
from longctx.config import ModelConfig  # noqa: E402
from longctx.loading import load_checkpoint  # noqa: E402
from longctx.loading.checkpoint import Checkpoint  # noqa: E402
from longctx.structured_output import StructuredOutput  # noqa: E402

RECORDS = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string", "maxLength": 16},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "score": {"type": "number"},
        },
        "required": ["id", "name", "tags", "score"],
        "additionalProperties": False,
    },
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def checkpoint(args: argparse.Namespace) -> Checkpoint:
    real = load_checkpoint(args.model)
    if not args.random_weights:
        return real
    config = real.config
    if args.tiny:
        hf = {
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": config.vocab_size,
            "max_position_embeddings": max(args.prompt_len * 2, 4096),
            "rope_theta": 10000.0,
            **TINY,
        }
        config = ModelConfig.from_hf(hf)
    return Checkpoint(config, real.tokenizer, f"random:{real.source}", None)


def make_llm(args: argparse.Namespace, ckpt: Checkpoint) -> LLM:
    return LLM(
        checkpoint=ckpt,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.max_tokens + 64,
        max_num_seqs=max(args.batch, args.n),
        kv_cache_gib=args.kv_cache_gib,
        enable_prefix_caching=False,  # the n test must show the fork's sharing, not the cache's
    )


class Clock:
    """Per-step facts from on_output: when every request has its first token, tokens then,
    and the most KV blocks in use."""

    def __init__(self, llm: LLM, num_requests: int) -> None:
        self.blocks = llm.engine.scheduler.blocks
        self.num_requests = num_requests
        self.firsts: set[str] = set()
        self.tokens: dict[str, int] = {}
        self.start = time.perf_counter()
        self.all_first: float | None = None
        self.tokens_at_first = 0
        self.peak_blocks = 0

    def __call__(self, out) -> None:
        self.tokens[out.request_id] = len(out.token_ids)
        if out.token_ids:
            self.firsts.add(out.request_id)
        if self.all_first is None and len(self.firsts) == self.num_requests:
            self.all_first = time.perf_counter()
            self.tokens_at_first = sum(self.tokens.values())
        used = self.blocks.num_blocks - self.blocks.num_free
        self.peak_blocks = max(self.peak_blocks, used)


def run(llm: LLM, prompts: list, params: SamplingParams, count: int) -> Clock:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    clock = Clock(llm, count)
    llm.generate(prompts, params, on_output=clock)
    clock.end = time.perf_counter()
    return clock


def decode_rows(args: argparse.Namespace, llm: LLM) -> list[dict]:
    chat = [{"role": "user", "content": "List records of fictional people as a JSON array."}]
    prompt = llm.tokenizer.apply_chat_template(chat)
    base = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    spec = StructuredOutput(json_schema=RECORDS)
    variants = {
        "unconstrained": base,
        "json_schema": dataclasses.replace(base, structured_output=spec),
    }
    run(llm, [prompt] * args.batch, base, args.batch)  # warm-up (kernels, graphs)
    rows = []
    times = llm.engine.runner.masks.times
    for name, params in variants.items():
        before = dataclasses.replace(times)
        clock = run(llm, [prompt] * args.batch, params, args.batch)
        tokens = sum(clock.tokens.values()) - clock.tokens_at_first
        steps = max(times.steps - before.steps, 1)
        rows.append(
            {
                "case": f"decode batch {args.batch}",
                "variant": name,
                "decode_tok_s": tokens / (clock.end - clock.all_first),
                "tokens": tokens,
                "step_ms": 1000 * (clock.end - clock.all_first) / (tokens / args.batch),
                # host ms per masked step: waiting for the previous tokens, advancing, filling
                "mask_wait_ms": 1000 * (times.wait_s - before.wait_s) / steps,
                "mask_advance_ms": 1000 * (times.advance_s - before.advance_s) / steps,
                "mask_fill_ms": 1000 * (times.fill_s - before.fill_s) / steps,
            }
        )
    rows[1]["vs_unconstrained"] = rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows


def fork_rows(args: argparse.Namespace, llm: LLM) -> list[dict]:
    prompt = [(7 * i + 11) % 30000 + 100 for i in range(args.prompt_len)]
    rows = []
    block = llm.engine.block_size
    for n in (1, args.n):
        params = SamplingParams(
            temperature=0.8, seed=0, max_tokens=args.fork_tokens, ignore_eos=True, n=n
        )
        clock = run(llm, [prompt], params, n)
        rows.append(
            {
                "case": f"n={n}, prompt {args.prompt_len}",
                "variant": "fork" if n > 1 else "single",
                "time_to_all_first_s": clock.all_first - clock.start,
                "peak_kv_blocks": clock.peak_blocks,
                "prompt_blocks": -(-args.prompt_len // block),
            }
        )
    single, forked = rows
    forked["prefill_vs_single"] = forked["time_to_all_first_s"] / single["time_to_all_first_s"]
    # Without sharing each extra sequence would hold prompt_blocks more; with it, its own
    # copy of the last prompt block and its continuation.
    extra = (forked["peak_kv_blocks"] - single["peak_kv_blocks"]) / (args.n - 1)
    forked["blocks_per_extra_sequence"] = extra
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--random-weights", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer shape (CPU smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=131072)
    ap.add_argument("--fork-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="structured_gpu")
    args = ap.parse_args()
    llm = make_llm(args, checkpoint(args))
    rows = decode_rows(args, llm) + fork_rows(args, llm)
    env = {**environment(), "model": llm.engine.checkpoint.source}
    notes = (
        "decode_tok_s: generated tokens after every sequence had its first one, over that "
        "time. n rows: prefix caching off, so sharing is the fork's alone."
    )
    write_results(out_dir(args.out), args.name, env, rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
