"""End-to-end CPU benchmark (issue: engine foundation) on the default model
(Qwen2.5-Coder-0.5B-Instruct GGUF, float32): prefill tokens/s at 2K and 8K tokens and decode
tokens/s, longctx beside transformers loading the same GGUF, same process, same threads.

  .venv/bin/python benchmarks/bench_e2e_cpu.py [--out benchmarks/results]
  (benchmarks/results/e2e_cpu.md: OMP_NUM_THREADS=1, on a machine whose cores are shared)
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, timed, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402
from longctx.loading import default_model_path  # noqa: E402


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def best_of(k: int, fn) -> float:
    return min(timed(fn) for _ in range(k))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--decode-ctx", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    path = default_model_path(fetch=True)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    # engine defaults (8K prompts prefill in 2 chunks), but no prefix caching: best_of repeats
    llm = LLM(dtype="float32", device="cpu", enable_prefix_caching=False)
    vocab = hf.config.vocab_size
    rows = []
    with torch.inference_mode():
        for n in lengths:
            ids = prompt(n, vocab, seed=n)
            x = torch.tensor([ids])
            t_hf = best_of(args.repeats, lambda x=x: hf(x, logits_to_keep=1))
            one = SamplingParams(max_tokens=1, temperature=0)
            t_us = best_of(args.repeats, lambda ids=ids, one=one: llm.generate([ids], one))
            rows.append(
                {
                    "what": f"prefill {n} tokens (tok/s)",
                    "transformers": n / t_hf,
                    "longctx": n / t_us,
                    "longctx_over_transformers": t_hf / t_us,
                }
            )
            print(rows[-1], flush=True)
        ids = prompt(args.decode_ctx, vocab, seed=1)
        x = torch.tensor([ids])
        steps = args.decode_steps
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        hf_1 = best_of(
            args.repeats, lambda: hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        )
        hf_n = best_of(
            args.repeats,
            lambda: hf.generate(x, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw),
        )
        us_1 = best_of(
            args.repeats,
            lambda: llm.generate(
                [ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            ),
        )
        us_n = best_of(
            args.repeats,
            lambda: llm.generate(
                [ids], SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
            ),
        )
        hf_tps, us_tps = steps / (hf_n - hf_1), steps / (us_n - us_1)
        rows.append(
            {
                "what": f"decode batch 1, ctx {args.decode_ctx} (tok/s)",
                "transformers": hf_tps,
                "longctx": us_tps,
                "longctx_over_transformers": us_tps / hf_tps,
            }
        )
        print(rows[-1], flush=True)
    notes = (
        "Default model (Qwen2.5-Coder-0.5B-Instruct, GGUF dequantized to float32) on the CPU; "
        "transformers loads the same GGUF, SDPA attention, logits_to_keep=1 for prefill; "
        f"best of {args.repeats}; longctx with its defaults (CPU prefill chunks of up to 8192 "
        "tokens)."
    )
    write_results(out_dir(args.out), "e2e_cpu", environment(), rows, notes)


if __name__ == "__main__":
    main()
