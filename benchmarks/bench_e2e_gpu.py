"""End-to-end GPU benchmark (issue: engine foundation): the Qwen2.5-7B-Instruct-1M architecture
with random weights, longctx (plain PyTorch attention backend, chunked prefill over the paged
cache) beside transformers (SDPA, logits_to_keep=1) in the same process.

  PYTHONPATH=. python benchmarks/bench_e2e_gpu.py --out $OUT          # H100 / H200
  PYTHONPATH=. python benchmarks/bench_e2e_gpu.py --tiny              # CPU smoke test

Measures: a correctness check (our last-token logits vs transformers with the same weights,
prompt prefilled in several chunks), TTFT at 32K and 128K for both, decode tokens/s at batch 1 and
16, and TTFT of a 512K-token prompt (transformers cannot hold its activations).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, timed, write_results  # noqa: E402
from longctx import LLM, SamplingParams  # noqa: E402
from longctx.config import ModelConfig  # noqa: E402
from longctx.loading import builtin_config  # noqa: E402
from longctx.loading.checkpoint import Checkpoint  # noqa: E402


def hf_model(cfg: ModelConfig, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa",
        torch_dtype=dtype,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
    with torch.no_grad():  # default init gives near-uniform attention; make it peaked
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def hf_ttft(model, ids: list[int], device: str) -> float:
    x = torch.tensor([ids], device=device)
    return timed(lambda: model(x, logits_to_keep=1, use_cache=True))


@torch.no_grad()
def hf_decode_tps(model, batch: int, ctx: int, steps: int, vocab: int, device: str) -> float:
    x = torch.tensor([prompt(ctx, vocab, seed=s) for s in range(batch)], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t1 = timed(lambda: model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw))
    tn = timed(lambda: model.generate(x, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw))
    return batch * steps / (tn - t1)


def ours_ttft(llm: LLM, ids: list[int]) -> float:
    return timed(lambda: llm.generate([ids], SamplingParams(max_tokens=1, temperature=0)))


def ours_decode_tps(llm: LLM, batch: int, ctx: int, steps: int, vocab: int) -> float:
    prompts = [prompt(ctx, vocab, seed=s) for s in range(batch)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    llm.generate(prompts, many)  # warm-up: first use of this batch size's kernels
    t1 = timed(lambda: llm.generate(prompts, one))
    tn = timed(lambda: llm.generate(prompts, many))
    return batch * steps / (tn - t1)


def check_correctness(cfg: ModelConfig, device: str, n: int, backend: str) -> str:
    """Last-token logprobs of a 4-layer float32 slice of the architecture, our chunked prefill
    against transformers' single pass. (Full-depth random bf16 nets are chaotic: rounding alone
    moves their logits, so the exact check is done in float32.)"""
    small = dataclasses.replace(cfg, num_layers=4)
    hf = hf_model(small, device, torch.float32)
    ids = prompt(n, small.vocab_size, seed=7)
    with torch.no_grad():
        ref = torch.log_softmax(
            hf(torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].double(), -1
        )
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    del hf
    ckpt = Checkpoint(
        config=small, tokenizer=None, source="check", weights=lambda s=state: iter(s.items())
    )
    llm = LLM(
        checkpoint=ckpt,
        dtype="float32",
        device=device,
        attention_backend=backend,
        max_num_batched_tokens=n // 4,
        kv_cache_gib=1.0,
    )
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
    err = max(abs(lp - ref[t].item()) for t, lp in out.logprobs[0].items())
    del llm, state
    gc.collect()
    return f"top token match={out.token_ids[0] == int(ref.argmax())}, max |logprob diff| {err:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU: a smoke test")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument(
        "--long", type=int, default=524288, help="chunked-prefill-only length (0: skip)"
    )
    ap.add_argument("--chunk", type=int, default=32768, help="max_num_batched_tokens")
    ap.add_argument("--backend", default="torch", help="longctx attention backend")
    ap.add_argument(
        "--keep-dca",
        action="store_true",
        help="keep the 1M model's dual_chunk_attention_config (DCA on)",
    )
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = builtin_config("qwen2.5-7b-instruct-1m")
    if not args.keep_dca:
        cfg = cfg.with_dca(None)
    if args.tiny:
        cfg = dataclasses.replace(
            cfg,
            hidden_size=256,
            intermediate_size=512,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            vocab_size=1024,
        )
    lengths = [int(x) for x in args.lengths.split(",")] if not args.tiny else [512, 1024]
    long_len = 0 if args.tiny else args.long
    decode_ctx, steps = (64, 8) if args.tiny else (1024, 64)
    env = environment()
    rows: list[dict] = []

    check = check_correctness(cfg, device, 256 if args.tiny else 4096, args.backend)
    print(f"check: {check}", flush=True)
    hf = hf_model(cfg, device, dtype)
    hf_ttft(hf, prompt(lengths[0], cfg.vocab_size), device)  # warm-up
    hf_times = {n: hf_ttft(hf, prompt(n, cfg.vocab_size), device) for n in lengths}
    hf_tps = {b: hf_decode_tps(hf, b, decode_ctx, steps, cfg.vocab_size, device) for b in (1, 16)}
    state = {k: v.detach().to("cpu") for k, v in hf.state_dict().items()}
    del hf
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None

    ckpt = Checkpoint(
        config=cfg, tokenizer=None, source="random-7b", weights=lambda s=state: iter(s.items())
    )
    chunk = 64 if args.tiny else args.chunk
    llm = LLM(
        checkpoint=ckpt,
        dtype="float32" if args.tiny else "bfloat16",
        device=device,
        attention_backend=args.backend,
        max_num_batched_tokens=chunk,
        kv_cache_gib=0.5 if args.tiny else None,
        enable_prefix_caching=False,  # repeated prompts are timed
    )
    del state
    gc.collect()
    ours_ttft(llm, prompt(lengths[0], cfg.vocab_size))  # warm-up
    for n in lengths:
        t = ours_ttft(llm, prompt(n, cfg.vocab_size))
        rows.append(
            {
                "what": f"TTFT {n // 1024}K (s)",
                "transformers": hf_times[n],
                "longctx": t,
                "ratio_longctx_over_hf": t / hf_times[n],
            }
        )
        print(rows[-1], flush=True)
    for b in (1, 16):
        tps = ours_decode_tps(llm, b, decode_ctx, steps, cfg.vocab_size)
        rows.append(
            {
                "what": f"decode batch {b}, ctx {decode_ctx} (tok/s)",
                "transformers": hf_tps[b],
                "longctx": tps,
                "ratio_longctx_over_hf": tps / hf_tps[b],
            }
        )
        print(rows[-1], flush=True)
    if long_len:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = ours_ttft(llm, prompt(long_len, cfg.vocab_size))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        rows.append(
            {
                "what": f"TTFT {long_len // 1024}K (s; transformers: does not fit)",
                "longctx": t,
                "peak_GiB": peak,
            }
        )
        print(rows[-1], flush=True)
    notes = (
        f"Qwen2.5-7B-Instruct-1M shape, random weights, {dtype}; "
        f"longctx attention_backend={args.backend}, DCA {'on' if cfg.dca else 'off'}, "
        f"max_num_batched_tokens={chunk}, KV cache {llm.engine.runner.kv_capacity_tokens} tokens; "
        f"decode columns are tokens/s (higher is better), TTFT columns seconds. "
        f"Correctness check (4-layer float32 slice of the same shape, prompt prefilled in 4 "
        f"chunks vs transformers' one pass): {check}"
    )
    write_results(
        out_dir(args.out),
        f"e2e_gpu_{args.backend}{'_dca' if cfg.dca else ''}" + ("_tiny" if args.tiny else ""),
        env,
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
