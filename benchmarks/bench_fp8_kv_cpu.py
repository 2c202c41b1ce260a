"""Accuracy of the fp8 KV cache on the real default model (CPU): kv_cache_dtype="fp8" against
"auto" (a float32 cache), same weights, same prompts, same schedule.

  .venv/bin/python benchmarks/bench_fp8_kv_cpu.py [--ablate] [--out benchmarks/results]

Six 2K-token engine runs (ten with --ablate). benchmarks/results/fp8_kv_cpu.md was made with
--ablate on 2 cores shared with another benchmark: 25 minutes.

Model: Qwen2.5-Coder-0.5B-Instruct (the default GGUF, dequantized to float32), float32 compute,
PyTorch backend. Prompts: the first --tokens tokens of a few repository files (code and prose).
For every prompt position the full logits of both engines are captured (the logits the engine
computes for prompt logprobs), and for 32 greedy tokens after the prompt, as long as both
engines generated the same tokens (the contexts then agree). Reported per prompt: max and mean
|logit difference| over all positions and the whole vocabulary, the std of the logits (their
scale), max and mean |logprob difference| of the actual next token, top-1 agreement over prompt
positions, and greedy-token agreement (count equal, first differing step).

Ablation on the first prompt (--ablate): the float32-cache engine with the keys and/or values
that attention reads quantized and dequantized in PyTorch (kv_quant.py), to see which of the
two carries the error: fp8 keys only, fp8 values only, both (a cross-check of the fp8
engine), and both rounded to bf16 (the error of a bf16 cache, for scale). Writes
fp8_kv_cpu.md / .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402

FILES = ("README.md", "longctx/ops/triton/flash_prefill.py", "longctx/engine/llm_engine.py")


class LogitRecorder:
    """Wraps model.compute_logits and keeps every call's output (float32, CPU)."""

    def __init__(self, llm: LLM) -> None:
        model = llm.engine.runner.model
        self.inner = model.compute_logits
        self.calls: list[torch.Tensor] = []
        model.compute_logits = self  # an instance attribute shadows the method

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.inner(hidden)
        self.calls.append(out.detach().float().cpu().clone())
        return out

    def take(self) -> list[torch.Tensor]:
        calls, self.calls = self.calls, []
        return calls


def run(llm: LLM, rec: LogitRecorder, ids: list[int], steps: int):
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate([ids], params)[0]
    calls = rec.take()
    prompt = torch.cat([c for c in calls if c.shape[0] > 1])  # prompt-logprob chunks, in order
    gen = [c for c in calls if c.shape[0] == 1]  # the sampled rows: prefill end, then decode
    return prompt, gen, out.token_ids


def compare(ids, a, b) -> dict:
    pa, ga, ta = a
    pb, gb, tb = b
    assert pa.shape == pb.shape == (len(ids) - 1, pa.shape[1])
    first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
    # generated steps whose context agrees: the first one to differ included
    gen_a = torch.cat(ga[: first + 1])
    gen_b = torch.cat(gb[: first + 1])
    la, lb = torch.cat([pa, gen_a]), torch.cat([pb, gen_b])
    diff = (la - lb).abs()
    target = torch.tensor(ids[1:])
    lpa = torch.log_softmax(pa, -1).gather(1, target[:, None])[:, 0]
    lpb = torch.log_softmax(pb, -1).gather(1, target[:, None])[:, 0]
    lp_diff = (lpa - lpb).abs()
    return dict(
        positions=la.shape[0],
        logit_max_abs_diff=diff.max().item(),
        logit_mean_abs_diff=diff.mean().item(),
        logit_std=la.std().item(),
        next_token_logprob_max_abs_diff=lp_diff.max().item(),
        next_token_logprob_mean_abs_diff=lp_diff.mean().item(),
        prompt_top1_agreement=(pa.argmax(-1) == pb.argmax(-1)).double().mean().item(),
        greedy_tokens_equal=f"{sum(x == y for x, y in zip(ta, tb))}/{len(ta)}",
        first_differing_greedy_token=first if first < len(ta) else None,
    )


def rounded(kind: str):
    from longctx.layers.attention.kv_quant import dequantize_fp8, quantize_fp8

    if kind == "fp8":
        return lambda x: dequantize_fp8(*quantize_fp8(x), x.dtype)
    if kind == "bf16":
        return lambda x: x.to(torch.bfloat16).to(x.dtype)
    return lambda x: x


def ablation(llm: LLM, rec: LogitRecorder, ids: list[int], steps: int, base) -> list[dict]:
    """The PyTorch backend's attention calls see rounded keys / values (idempotent: the
    cached ones are rounded again to the same values)."""
    import longctx.layers.attention.torch_backend as tb

    attn, decode = tb.attention_with_lse, tb.decode_attention
    rows = []
    for name, kk, vk in (
        ("fp8 keys only", "fp8", None),
        ("fp8 values only", None, "fp8"),
        ("fp8 keys and values (simulated)", "fp8", "fp8"),
        ("bf16 keys and values (a bf16 cache)", "bf16", "bf16"),
    ):
        fk, fv = rounded(kk), rounded(vk)
        tb.attention_with_lse = lambda q, k, v, fk=fk, fv=fv, **kw: attn(q, fk(k), fv(v), **kw)
        tb.decode_attention = lambda q, k, v, *a, fk=fk, fv=fv: decode(q, fk(k), fv(v), *a)
        try:
            rows.append(
                dict(prompt=f"ablation: {name}", **compare(ids, base, run(llm, rec, ids, steps)))
            )
        finally:
            tb.attention_with_lse, tb.decode_attention = attn, decode
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length")
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens generated")
    ap.add_argument(
        "--ablate", action="store_true", help="also the ablation (4 more runs of the first prompt)"
    )
    args = ap.parse_args()
    start = time.perf_counter()
    kw = dict(dtype="float32", device="cpu", kv_cache_gib=1.0, attention_backend="torch")
    kw["enable_prefix_caching"] = False  # the ablation reruns a prompt: it must be recomputed
    auto = LLM(kv_cache_dtype="auto", **kw)
    fp8 = LLM(kv_cache_dtype="fp8", **kw)
    recs = LogitRecorder(auto), LogitRecorder(fp8)
    tok = auto.tokenizer
    rows, ablated = [], []
    for name in FILES:
        ids = tok.encode(Path(name).read_text(encoding="utf-8"))[: args.tokens]
        a = run(auto, recs[0], ids, args.steps)
        b = run(fp8, recs[1], ids, args.steps)
        rows.append(dict(prompt=f"{name} ({len(ids)} tokens)", **compare(ids, a, b)))
        print(rows[-1], flush=True)
        if args.ablate and not ablated:
            del b
            ablated = ablation(auto, recs[0], ids, args.steps, a)
    rows += ablated
    notes = (
        "Qwen2.5-Coder-0.5B-Instruct (default GGUF, dequantized), float32 compute, PyTorch "
        "backend: kv_cache_dtype='fp8' (e4m3 + float32 scale per token and kv head, keys "
        "relative to per-layer zero points from the k bias) against "
        "'auto' (float32 cache). Logits of every prompt position and of the greedy steps "
        "whose context agrees (the first differing step included); logit_std is the scale "
        "of the logits. prompt_top1_agreement: argmax over the vocabulary equal at a prompt "
        f"position. {args.steps} greedy tokens. Ablation rows: the float32-cache engine with "
        "the keys and/or values attention reads rounded in PyTorch, on the first prompt. "
        "Wall time "
        f"{time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads."
    )
    write_results(out_dir(args.out), "fp8_kv_cpu", environment(), rows, notes)


if __name__ == "__main__":
    main()
