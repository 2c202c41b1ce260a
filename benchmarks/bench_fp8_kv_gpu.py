"""FP8 (e4m3 + per token/head scales) KV cache on one GPU (issue #6, item 4).

  PYTHONPATH=. python benchmarks/bench_fp8_kv_gpu.py --out $OUT
  PYTHONPATH=. python benchmarks/bench_fp8_kv_gpu.py --sections checks,decode --out $OUT

1. checks   The Triton kernels over an fp8 cache at the Qwen2.5-7B head layout (28 q / 4 kv
            heads, d=128, bf16 queries): paged prefill (64- and 128-token blocks, DCA + YaRN,
            contiguous keys) and ragged split-K decode (dense, DCA, CUDA-graph replay) against
            float64 references computed on the DEQUANTIZED cache (kernel error only); the
            error against the unquantized bf16 values is reported beside (quantization error).
2. decode   paged_decode at 128K / 512K / 1M context (batch 1) and 128K x 8, bf16 cache against
            fp8 cache, one layer of KV, timed as CUDA-graph replays; bytes read and the copy
            floor (KV bytes / device-to-device copy bandwidth of this run).
3. memory   The Qwen2.5-7B-Instruct-1M architecture (random weights, bf16, DCA, Triton
            backend, CUDA graphs) with kv_cache_dtype="fp8" and a cache of 1M+ tokens:
            torch.cuda memory of weights, cache, peak (after 4K and 32K prefills, section 4);
            the bf16 cache of 1M tokens computed beside it.
4. logits   The same model, fp8 cache against a bf16 cache (same weights): prompt logprobs of
            every position of 4K- and 32K-token random prompts, top-20 logprobs of the first
            generated token, greedy agreement over 16 tokens, and the 32K prefill time.

Results: fp8_kv_gpu.md / .json under --out (rewritten after every section, so a run cut short
keeps what it measured); a short table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.bench_attention_gpu import (  # noqa: E402
    DCA,
    DCA_1M,
    ORIGINAL_MAX,
    SCALE,
    THETA,
    Checks,
    copy_bandwidth,
    reference,
    rope,
)
from benchmarks.common import environment, out_dir  # noqa: E402
from longctx.layers.attention.kv_quant import FP8_DTYPE, dequantize_fp8, quantize_fp8  # noqa: E402
from longctx.ops.triton import DecodeConfig, flash_prefill, paged_decode  # noqa: E402
from longctx.ops.triton.paged_decode import decode_config  # noqa: E402

DTYPE = torch.bfloat16
GIB = 2**30
# fp8 decode configs timed beside the default (FP8_DECODE_CONFIGS), dense, every context
FP8_CANDIDATES = {
    "n64 w4 s3 pps2 (the bf16 config)": DecodeConfig(64, 4, 3, 2),
    "n64 w4 s5 pps2": DecodeConfig(64, 4, 5, 2),
    "n64 w8 s4 pps2": DecodeConfig(64, 8, 4, 2),
    "n64 w8 s5 pps2": DecodeConfig(64, 8, 5, 2),
    "n128 w8 s3 pps1": DecodeConfig(128, 8, 3, 1),
}
H100_BYTES = 79.1 * GIB  # what torch reports as total memory of an H100 80GB


@dataclass
class Setup:
    """Sizes of every section: the GPU run, or --smoke (CPU, Triton interpreter, tiny)."""

    dev: str = "cuda"
    hq: int = 28
    hkv: int = 4
    d: int = 128
    prefill: tuple[int, int] = (4096, 1024)  # keys, queries of the chunk
    contiguous: int = 2048
    dca_prefill: tuple[int, int] = (2048, 768)
    dca_small: DCA = DCA(768, 256)  # c = 512: four chunks, all three parts
    dca_yarn: int = 512
    decode_lens: list[int] = field(default_factory=lambda: [1, 1000, 4097, 20000])
    decode_dca: DCA = DCA(8192, 2048)  # c = 6144: 20000 has all three parts
    decode_cases: list[tuple[int, int]] = field(
        default_factory=lambda: [(1, 131072), (1, 524288), (1, 1048576), (8, 131072)]
    )
    model: str = "qwen2.5-7b-instruct-1m"
    admit_tokens: int = 2**20  # the context the fp8 cache must hold
    lengths: list[int] = field(default_factory=lambda: [4096, 32768])
    prefill_len: int = 32768


S = Setup()
SMOKE = Setup(
    dev="cpu",
    hq=4,
    hkv=2,
    d=64,
    prefill=(256, 64),
    contiguous=128,
    dca_prefill=(256, 96),
    dca_small=DCA(96, 32),
    dca_yarn=64,
    decode_lens=[1, 50, 130, 300],
    decode_dca=DCA(96, 32),
    decode_cases=[(1, 512), (2, 256)],
    admit_tokens=2000,
    lengths=[100, 300],
    prefill_len=256,
)
# --smoke model: 2 layers, DCA with c = 128 (a multiple of the 64-token KV block)
SMOKE_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    dual_chunk_attention_config=dict(chunk_size=160, local_size=32),
)


def cuda() -> bool:
    return S.dev == "cuda"


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded from the host generator; drawn on the GPU (host randn of 1M tokens is slow)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    g = torch.Generator(device=S.dev).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=S.dev, dtype=torch.float32).to(DTYPE)


def arange(n: int) -> torch.Tensor:
    return torch.arange(n, device=S.dev)


def synchronize() -> None:
    if cuda():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# fp8 caches
# ------------------------------------------------------------------------------------------------


def quantize_seq(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[L, Hkv, D] -> (fp8 values, scales [L, Hkv], dequantized float32)."""
    xq, s = quantize_fp8(x)
    return xq, s, dequantize_fp8(xq, s, torch.float32)


def paged_fp8(seqs_k, seqs_v, page: int, gen: torch.Generator):
    """Quantize each sequence's k/v and scatter values and scales into one paged cache with a
    shuffled block table. Unused rows: zero values, NaN scales (a stray read shows as NaN).
    Returns (kc, vc, k_scale, v_scale, table [B, width], ctx [B], dequantized ks, vs)."""
    need = [-(-k.shape[0] // page) for k in seqs_k]
    blocks = sum(need) + 1
    perm = torch.randperm(blocks, generator=gen).to(S.dev)
    kc = torch.zeros((blocks, page, S.hkv, S.d), dtype=FP8_DTYPE, device=S.dev)
    vc = torch.zeros_like(kc)
    ksc = torch.full((blocks, page, S.hkv), float("nan"), device=S.dev)
    vsc = torch.full_like(ksc, float("nan"))
    table = torch.zeros((len(seqs_k), max(need)), dtype=torch.int64, device=S.dev)
    kds, vds, start = [], [], 0
    for i, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        ids = perm[start : start + need[i]]
        start += need[i]
        table[i, : need[i]] = ids
        slots = (ids[:, None] * page + arange(page)).flatten()[: k.shape[0]]
        for cache, scales, x, out in ((kc, ksc, k, kds), (vc, vsc, v, vds)):
            xq, s, xd = quantize_seq(x)
            cache.view(torch.uint8).view(-1, S.hkv, S.d)[slots] = xq.view(torch.uint8)
            scales.view(-1, S.hkv)[slots] = s
            out.append(xd)
    ctx = torch.tensor([k.shape[0] for k in seqs_k], device=S.dev)
    return kc, vc, ksc, vsc, table, ctx, kds, vds


def quant_error(name: str, out, lse, ref_out, ref_lse) -> dict:
    finite = torch.isfinite(ref_lse)
    return dict(
        check=f"{name}: quantization error (vs unquantized bf16 values)",
        max_abs_err=(out.double() - ref_out.double()).abs().max().item(),
        mean_abs_err=(out.double() - ref_out.double()).abs().mean().item(),
        lse_abs_err=(lse.double() - ref_lse.double())[finite].abs().max().item(),
        ok="info",
    )


# ------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------


def check_prefill(ch: Checks, info: list[dict], gen: torch.Generator) -> None:
    lk, lq = S.prefill
    q = randn(lk, S.hq, S.d, gen=gen)
    k, v = randn(lk, S.hkv, S.d, gen=gen), randn(lk, S.hkv, S.d, gen=gen)
    qpos = arange(lk)[-lq:]
    for page in (64, 128, 16):  # 128: the 128-key tile config
        kc, vc, ksc, vsc, table, _, (kd,), (vd,) = paged_fp8([k], [v], page, gen)
        out, lse = flash_prefill(
            q[-lq:],
            kc,
            vc,
            block_table=table[0],
            q_pos0=lk - lq,
            scale=SCALE,
            k_scale=ksc,
            v_scale=vsc,
        )
        name = f"fp8 prefill chunk (last {lq} of {lk}) paged({page})"
        ref = reference(q[-lq:], kd, vd, qpos)
        ch.compare(f"{name} vs float64 on dequantized cache", out, lse, *ref)
        if page == 64:
            info.append(quant_error(name, out, lse, *reference(q[-lq:], k, v, qpos)))
    # contiguous fresh keys [Lk, Hkv, D] with scales [Lk, Hkv]
    (kq, ks, kd), (vq, vs, vd) = quantize_seq(k), quantize_seq(v)
    n = S.contiguous
    ch.compare(
        f"fp8 prefill causal {n} contiguous keys vs float64 on dequantized",
        *flash_prefill(q[:n], kq[:n], vq[:n], scale=SCALE, k_scale=ks[:n], v_scale=vs[:n]),
        *reference(q[:n], kd[:n], vd[:n], arange(n)),
    )


def check_dca_prefill(ch: Checks, info: list[dict], gen: torch.Generator) -> None:
    (n, lq), dca, yarn = S.dca_prefill, S.dca_small, S.dca_yarn
    q = randn(n, S.hq, S.d, gen=gen)
    k_raw, v = randn(n, S.hkv, S.d, gen=gen), randn(n, S.hkv, S.d, gen=gen)
    pos = arange(n)
    k_dca = rope(k_raw, pos % dca.chunk_len).to(DTYPE)
    kw = dict(scale=SCALE, rope_theta=THETA, yarn_original_max=yarn, dca=dca)
    for page in (64, 128):
        kc, vc, ksc, vsc, table, _, (kd,), (vd,) = paged_fp8([k_dca], [v], page, gen)
        out, lse = flash_prefill(
            q[n - lq :], kc, vc, block_table=table[0], q_pos0=n - lq, k_scale=ksc, v_scale=vsc, **kw
        )
        name = f"fp8 DCA prefill chunk (c={dca.chunk_len}, YaRN) paged({page})"
        ref = reference(q[n - lq :], kd, vd, pos[n - lq :], dca=dca, yarn=yarn)
        ch.compare(f"{name} vs float64 on dequantized", out, lse, *ref)
        if page == 64:
            raw = reference(q[n - lq :], k_dca, v, pos[n - lq :], dca=dca, yarn=yarn)
            info.append(quant_error(name, out, lse, *raw))


def check_decode(ch: Checks, info: list[dict], gen: torch.Generator) -> None:
    lens, page, dca = S.decode_lens, 64, S.decode_dca
    for variant in ("dense", "dca"):
        use_dca = variant == "dca"
        ks = [randn(n, S.hkv, S.d, gen=gen) for n in lens]
        vs = [randn(n, S.hkv, S.d, gen=gen) for n in lens]
        if use_dca:
            ks = [rope(k, arange(k.shape[0]) % dca.chunk_len).to(DTYPE) for k in ks]
        q = randn(len(lens), S.hq, S.d, gen=gen)
        kc, vc, ksc, vsc, table, ctx, kds, vds = paged_fp8(ks, vs, page, gen)
        kw = dict(scale=SCALE, k_scale=ksc, v_scale=vsc)
        if use_dca:
            kw.update(rope_theta=THETA, dca=dca, yarn_original_max=4096)
        out, lse = paged_decode(q, kc, vc, table, ctx, **kw)
        refs = partial(decode_refs, q, lens, dca if use_dca else None)
        name = f"fp8 decode {variant} ragged {lens}"
        ch.compare(f"{name} vs float64 on dequantized", out, lse, *refs(kds, vds))
        info.append(quant_error(name, out, lse, *refs(ks, vs)))
        if cuda():
            check_decode_graph(ch, variant, q, kc, vc, table, ctx, kw)


def decode_refs(q, lens, dca, keys, values):
    """float64 reference of each sequence's last position over its whole context."""
    rs = [
        reference(
            q[i : i + 1],
            keys[i],
            values[i],
            torch.tensor([n - 1], device=S.dev),
            dca=dca,
            yarn=4096 if dca is not None else None,
        )
        for i, n in enumerate(lens)
    ]
    return torch.cat([r[0] for r in rs]), torch.cat([r[1] for r in rs], 1)


def check_decode_graph(ch: Checks, variant, q, kc, vc, table, ctx, kw) -> None:
    """Capture once (scales are static tensors like the cache), replay with new lengths."""
    static_ctx = ctx.clone()
    max_context = table.shape[1] * kc.shape[1]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_decode(q, kc, vc, table, static_ctx, max_context=max_context, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = paged_decode(q, kc, vc, table, static_ctx, max_context=max_context, **kw)
    new = torch.clamp(ctx - 7, min=0)
    new[0] = 0  # a padding slot
    static_ctx.copy_(new)
    graph.replay()
    ref = paged_decode(q, kc, vc, table, new, max_context=max_context, **kw)
    ch.compare(
        f"fp8 decode {variant} CUDA-graph replay with new lengths vs eager",
        out,
        lse,
        *ref,
        tol=1e-6,
    )


def run_checks() -> tuple[Checks, list[dict]]:
    print(f"== 1. correctness (bf16 q, fp8 cache, {S.hq} q / {S.hkv} kv heads, d={S.d})")
    ch, info, gen = Checks(), [], torch.Generator(device="cpu").manual_seed(0)
    for fn in (check_prefill, check_dca_prefill, check_decode):
        try:
            fn(ch, info, gen)
        except Exception as e:  # a crash is a failed check, reported with the others
            ch.rows.append(
                dict(check=f"{fn.__name__} raised {type(e).__name__}: {e}"[:300], ok=False)
            )
            print(f"  FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
    for r in info:
        print(
            f"  info {r['check']}: max {r['max_abs_err']:.3e}, mean {r['mean_abs_err']:.3e}, "
            f"lse {r['lse_abs_err']:.3e}",
            flush=True,
        )
    empty_cache()
    return ch, info


def empty_cache() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# 2. decode speed
# ------------------------------------------------------------------------------------------------


def time_ms(fn) -> float:
    fn()
    synchronize()
    if cuda():
        import triton

        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_prefill(page: int = 64) -> list[dict]:
    """One causal prefill of S.prefill_len tokens over a paged cache, bf16 against fp8 (the
    kernel alone; its default tiles, and one alternative for fp8)."""
    from longctx.ops.triton import KernelConfig

    n = S.prefill_len
    print(f"== 2. prefill kernel {n} tokens causal, paged({page}), bf16 vs fp8 cache", flush=True)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        randn(n, S.hq, S.d, gen=gen),
        randn(n, S.hkv, S.d, gen=gen),
        randn(n, S.hkv, S.d, gen=gen),
    )
    kc8, vc8, ksc, vsc, table, _, _, _ = paged_fp8([k], [v], page, gen)
    blocks = kc8.shape[0]
    kb = torch.zeros((blocks, page, S.hkv, S.d), dtype=DTYPE, device=S.dev)
    vb = torch.zeros_like(kb)
    slots = (table[0][:, None] * page + arange(page)).flatten()[:n]
    kb.view(-1, S.hkv, S.d)[slots], vb.view(-1, S.hkv, S.d)[slots] = k, v
    flops = 2 * 2 * n * n * S.d * S.hq / 2
    runs = {
        ("bf16", "default"): partial(flash_prefill, q, kb, vb, block_table=table[0], scale=SCALE),
        ("fp8", "default"): partial(
            flash_prefill,
            q,
            kc8,
            vc8,
            block_table=table[0],
            scale=SCALE,
            k_scale=ksc,
            v_scale=vsc,
        ),
    }
    if cuda():
        runs[("fp8", "m128 n64 w8 s4")] = partial(
            runs[("fp8", "default")], config=KernelConfig(128, 64, 8, 4)
        )
    rows, base = [], None
    for (cache, cfg), fn in runs.items():
        try:
            fn()
            synchronize()
            if cuda():
                import triton

                ms = triton.testing.do_bench(fn, return_mode="median")
            else:
                ms = time_ms(fn)
        except Exception as e:
            print(f"  prefill {cache} {cfg}: error {e}"[:300], flush=True)
            rows.append(dict(what="prefill kernel", cache=cache, config=cfg, note=str(e)[:200]))
            continue
        base = ms if cache == "bf16" else base
        rows.append(
            dict(
                what="prefill kernel",
                cache=cache,
                config=cfg,
                context=n,
                ms=ms,
                TFLOP_s=flops / (ms * 1e-3) / 1e12,
                speedup_vs_bf16=base / ms if base else float("nan"),
            )
        )
        print(
            f"  prefill {cache} {cfg}: {ms:.2f} ms, {rows[-1]['TFLOP_s']:.0f} TFLOP/s", flush=True
        )
    return rows


def bench_decode(page: int = 64) -> list[dict]:
    print("== 2. decode kernel, bf16 vs fp8 cache (one layer, CUDA-graph replays)", flush=True)
    bw = copy_bandwidth() if cuda() else float("nan")
    print(f"  copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    gen = torch.Generator().manual_seed(2)
    tokens = max(b * n for b, n in S.decode_cases)
    blocks = tokens // page + 1
    kc = randn(blocks, page, S.hkv, S.d, gen=gen)
    vc = randn(blocks, page, S.hkv, S.d, gen=gen)
    kq, ks = quantize_fp8(kc)
    vq, vs = quantize_fp8(vc)
    perm = torch.randperm(blocks, generator=gen).to(S.dev)
    variants = {
        "dense": dict(scale=SCALE),
        "DCA C=262144 W=8192": dict(
            scale=SCALE, rope_theta=THETA, dca=DCA_1M, yarn_original_max=ORIGINAL_MAX
        ),
    }
    rows = []

    def timed(label: str, cache: str, vname: str, cfg_name: str, batch: int, ctx: int, fn):
        kv_bytes = batch * ctx * S.hkv * (S.d * 2 * 2 if cache == "bf16" else (S.d + 4) * 2)
        try:
            ms = time_ms(fn)
        except Exception as e:  # one failing variant must not hide the others
            print(f"  {label}: error {e}"[:300], flush=True)
            rows.append(dict(cache=cache, variant=vname, config=cfg_name, note=str(e)[:200]))
            return None
        rows.append(
            dict(
                what="decode kernel",
                cache=cache,
                variant=vname,
                config=cfg_name,
                batch=batch,
                context=ctx,
                us=ms * 1e3,
                kv_MiB=kv_bytes / 2**20,
                GB_s=kv_bytes / (ms * 1e-3) / 1e9,
                of_copy_floor=(kv_bytes / bw * 1e3) / ms,
            )
        )
        print(
            f"  {label}: {ms * 1e3:.1f} us, {rows[-1]['GB_s']:.0f} GB/s "
            f"({rows[-1]['of_copy_floor']:.2f} of copy floor)",
            flush=True,
        )
        return ms

    def default_name(vname: str) -> str:  # what paged_decode picks for an fp8 cache
        c = decode_config(S.d, fp8=vname == "dense")
        return f"default n{c.block_n} w{c.num_warps} s{c.num_stages} pps{c.programs_per_sm}"

    for batch, ctx in S.decode_cases:
        n = ctx // page
        table = perm[: batch * n].view(batch, n).contiguous()
        lens = torch.full((batch,), ctx, device=S.dev, dtype=torch.int64)
        q = randn(batch, S.hq, S.d, gen=gen)
        for vname, kw in variants.items():
            at = f"{vname} B={batch} {ctx // 1024}K"
            bf16 = partial(paged_decode, q, kc, vc, table, lens, **kw)
            t16 = timed(f"bf16 {at}", "bf16", vname, "default", batch, ctx, bf16)
            fp8 = partial(paged_decode, q, kq, vq, table, lens, k_scale=ks, v_scale=vs, **kw)
            name = default_name(vname)
            t8 = timed(f"fp8 {at} {name}", "fp8", vname, name, batch, ctx, fp8)
            if t16 and t8:
                rows[-1]["speedup_vs_bf16"] = t16 / t8
            for cname, cfg in FP8_CANDIDATES.items():
                fn = partial(fp8, config=cfg)
                t = timed(f"fp8 {at} {cname}", "fp8", vname, cname, batch, ctx, fn)
                if t16 and t:
                    rows[-1]["speedup_vs_bf16"] = t16 / t
    del kc, vc, kq, vq, ks, vs
    empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# 3. + 4. the 7B-1M engine: memory of a 1M-token fp8 cache; logits fp8 vs bf16 cache
# ------------------------------------------------------------------------------------------------


def build_llm(model: str, kv: str, kv_gib: float, chunk: int | None = None):
    from longctx import LLM

    kw = {} if cuda() else dict(device="cpu", attention_backend="triton")  # the interpreter
    if chunk:
        kw["max_num_batched_tokens"] = chunk
    return LLM(
        model=model,
        random_weights=True,
        dtype="bfloat16",
        kv_cache_dtype=kv,
        kv_cache_gib=kv_gib,
        max_num_seqs=1,  # one CUDA-graph bucket: less capture time
        enable_prefix_caching=False,  # prompts are timed again
        **kw,
    )


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def allocated() -> int:
    return torch.cuda.memory_allocated() if cuda() else 0


def peak() -> int:
    return torch.cuda.max_memory_allocated() if cuda() else 0


def prompts_of(lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run_prompts(llm, prompts: list[list[int]]) -> dict:
    from longctx import SamplingParams

    params = SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True, logprobs=20, prompt_logprobs=0
    )
    res = {}
    for ids in prompts:
        out = llm.generate([ids], params)[0]
        res[len(ids)] = dict(
            prompt=[out.prompt_logprobs[p][ids[p]] for p in range(1, len(ids))],
            first_top=out.logprobs[0],
            tokens=out.token_ids,
        )
    # decode through the CUDA graphs (prompt logprobs kept the steps above eager)
    graphs = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=20)
    out = llm.generate([prompts[0]], graphs)[0]
    eager = res[len(prompts[0])]
    res["graph_tokens_equal"] = sum(a == b for a, b in zip(out.token_ids, eager["tokens"]))
    res["graph_first_top20_max_abs_diff"] = max(
        abs(v - eager["first_top"][t])
        for t, v in out.logprobs[0].items()
        if t in eager["first_top"]
    )
    # prefill time of the longest prompt (one token, no prompt logprobs), kernels warm
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    synchronize()
    t = time.perf_counter()
    llm.generate([prompts[-1]], one)
    synchronize()
    res["ttft_s"] = time.perf_counter() - t
    return res


def compare(a: dict, b: dict) -> dict:
    """Two runs of one prompt: prompt logprobs of every position, top-20 logprobs of the
    first generated token, greedy tokens."""
    diff = torch.tensor(a["prompt"], dtype=torch.float64) - torch.tensor(b["prompt"])
    top = [t for t in a["first_top"] if t in b["first_top"]]
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
    return dict(
        prompt_logprob_max_abs_diff=diff.abs().max().item(),
        prompt_logprob_mean_abs_diff=diff.abs().mean().item(),
        prompt_logprob_std=torch.tensor(a["prompt"]).std().item(),
        first_token_top20_max_abs_diff=max(abs(a["first_top"][t] - b["first_top"][t]) for t in top),
        first_token_top20_shared=len(top),
        greedy_tokens_equal=f"{same}/{len(a['tokens'])}",
        first_differing_token=first,
    )


def bench_engine(deadline: float) -> tuple[list[dict], list[dict]]:
    from longctx import SamplingParams
    from longctx.engine.kv_cache import kv_bytes_per_token, kv_cache_bytes

    model = S.model
    if not cuda():  # --smoke: a tiny config with DCA
        model = str(Path(tempfile.mkdtemp()) / "config.json")
        Path(model).write_text(json.dumps(SMOKE_CONFIG))
    print(f"== 3. memory: {model}, random weights, fp8 cache of {S.admit_tokens}+ tokens")
    total = torch.cuda.get_device_properties(0).total_memory if cuda() else 0
    empty_cache()
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    base = allocated()
    from longctx.loading import random_checkpoint

    cfg = random_checkpoint(model).config
    fp8_tok = kv_bytes_per_token(cfg, FP8_DTYPE)
    bf16_tok = kv_bytes_per_token(cfg, torch.bfloat16)
    want = S.admit_tokens + 4096  # the context plus room
    kv_gib = math.ceil(want * fp8_tok / GIB * 10) / 10
    t = time.perf_counter()
    llm = build_llm(model, "fp8", kv_gib)
    build_s = time.perf_counter() - t
    runner = llm.engine.runner
    w = weight_bytes(runner.model)
    cache = kv_cache_bytes(runner.kv_caches)
    after_build = allocated() - base
    cap = runner.kv_capacity_tokens
    print(
        f"  built in {build_s:.0f} s: weights {w / GIB:.2f} GiB, fp8 cache {cache / GIB:.2f} GiB "
        f"({cap} tokens), allocated {after_build / GIB:.2f} GiB, peak {(peak() - base) / GIB:.2f}"
        " GiB",
        flush=True,
    )
    try:
        llm.engine.check_fits(S.admit_tokens - 1, SamplingParams(max_tokens=1))
        fits: bool | str = True
    except Exception as e:
        fits = f"no: {e}"
    prompts = prompts_of(S.lengths, cfg.vocab_size)
    fp8_res = None
    if time.perf_counter() < deadline:
        print(f"== 4. logits: prompts {S.lengths}, fp8 cache", flush=True)
        fp8_res = run_prompts(llm, prompts)
    peak_run = peak() - base
    mem_rows = [
        dict(
            what="kv_cache_dtype=fp8 (measured)",
            kv_cache_gib=kv_gib,
            capacity_tokens=cap,
            admits_context=f"{S.admit_tokens}: {fits}",
            weights_GiB=w / GIB,
            kv_cache_GiB=cache / GIB,
            allocated_after_build_GiB=after_build / GIB,
            peak_GiB=peak_run / GIB,
            gpu_total_GiB=total / GIB,
            peak_of_gpu=peak_run / total if total else float("nan"),
            peak_of_H100_80GB=peak_run / H100_BYTES,
        )
    ]
    bf16_cache = bf16_tok * S.admit_tokens
    mem_rows.append(
        dict(
            what="bf16 cache (computed)",
            capacity_tokens=S.admit_tokens,
            kv_cache_GiB=bf16_cache / GIB,
            weights_GiB=w / GIB,
            peak_GiB=(peak_run - cache + bf16_cache) / GIB,
            gpu_total_GiB=total / GIB,
            peak_of_gpu=(peak_run - cache + bf16_cache) / total if total else float("nan"),
            peak_of_H100_80GB=(peak_run - cache + bf16_cache) / H100_BYTES,
            note=f"the {kv_gib} GiB budget holds {int(kv_gib * GIB // bf16_tok)} bf16 tokens",
        )
    )
    for r in mem_rows:
        print(f"  {r}", flush=True)
    del llm, runner
    empty_cache()
    logit_rows: list[dict] = []
    if fp8_res is None or time.perf_counter() > deadline:
        return mem_rows, logit_rows
    print("== 4. logits: bf16 cache", flush=True)
    need = (max(S.lengths) + 64) * bf16_tok
    bf16_gib = math.ceil(need / GIB * 10) / 10 + 0.1
    llm = build_llm(model, "auto", bf16_gib)
    bf16_res = run_prompts(llm, prompts)
    del llm
    empty_cache()
    noise_res, chunk = None, max(S.lengths) // 4
    if time.perf_counter() < deadline:  # the noise floor: bf16 again, prefill in 4x more chunks
        print(f"== 4. logits: bf16 cache, prefill in chunks of {chunk} (noise floor)", flush=True)
        llm = build_llm(model, "auto", bf16_gib, chunk=chunk)
        noise_res = run_prompts(llm, prompts)
        del llm
        empty_cache()
    pairs = [("fp8 cache vs bf16 cache", fp8_res)]
    if noise_res is not None:
        pairs.append((f"bf16 cache, {chunk}-token chunks vs one chunk (noise floor)", noise_res))
    for label, other in pairs:
        for n in S.lengths:
            row = dict(what=f"{label}: {n}-token prompt", **compare(bf16_res[n], other[n]))
            logit_rows.append(row)
            print(f"  {row}", flush=True)
    for name, res in (("bf16", bf16_res), ("fp8", fp8_res)):
        logit_rows.append(
            dict(
                what=f"{name} cache: CUDA-graph decode vs eager, {S.lengths[0]}-token prompt",
                greedy_tokens_equal=f"{res['graph_tokens_equal']}/16",
                first_token_top20_max_abs_diff=res["graph_first_top20_max_abs_diff"],
            )
        )
    logit_rows.append(
        dict(
            what=f"prefill {max(S.lengths)} tokens (s), one request",
            bf16_cache=bf16_res["ttft_s"],
            fp8_cache=fp8_res["ttft_s"],
        )
    )
    return mem_rows, logit_rows


# ------------------------------------------------------------------------------------------------


def main() -> None:
    global S
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="checks,decode,memory")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (interpreter)")
    ap.add_argument("--budget-s", type=float, default=380.0, help="skip later sections past this")
    args = ap.parse_args()
    if args.smoke:
        S = SMOKE
    start = time.perf_counter()
    deadline = start + args.budget_s
    sections = set(args.sections.split(","))
    out = out_dir(args.out)
    env = environment()
    rows: list[dict] = []
    notes = [
        "FP8 e4m3 KV cache (float32 scale per token and kv head), bf16 queries and compute. "
        "checks: max errors against float64 on the dequantized cache (tolerance 2e-2 + 2e-2 "
        "|ref|, bf16 outputs), 'info' rows: error against the unquantized bf16 values. "
        "decode: one layer of KV, CUDA-graph replay median; kv_MiB counts the fp8 scales. "
        "memory: torch.cuda allocations; the peak includes a 32K-token prefill chunk and the "
        "prompt-logprob logits of section 4. logits: the same random-weight model and prompts "
        "with a bf16 and an fp8 cache."
    ]
    failed: list[str] = []

    def save() -> None:
        write_sections(out, "fp8_kv_gpu", env, rows, notes)

    if "checks" in sections:
        ch, info = run_checks()
        rows += [dict(section="checks", **r) for r in ch.rows + info]
        failed = ch.failed
        save()
    if "decode" in sections and time.perf_counter() < deadline:
        rows += [dict(section="decode", **r) for r in bench_decode()]
        save()
        rows += [dict(section="prefill", **r) for r in bench_prefill()]
        save()
    if "memory" in sections and time.perf_counter() < deadline:
        mem_rows: list[dict] = []
        logit_rows: list[dict] = []
        try:
            mem_rows, logit_rows = bench_engine(deadline)
        except Exception as e:  # keep the other sections' results
            import traceback

            traceback.print_exc()
            notes.append(f"engine sections failed: {type(e).__name__}: {e}"[:500])
        rows += [dict(section="memory", **r) for r in mem_rows]
        rows += [dict(section="logits", **r) for r in logit_rows]
    notes.append(f"wall time {time.perf_counter() - start:.0f} s")
    save()

    print("\n== summary")
    for r in rows:
        if r["section"] == "checks" and r.get("ok") is True:
            continue
        print("  " + ", ".join(f"{k}={_short(v)}" for k, v in r.items()))
    n_checks = sum(1 for r in rows if r["section"] == "checks" and r.get("ok") != "info")
    print(f"  checks: {n_checks} run, failed: {failed or 'none'}")
    if failed:
        sys.exit(1)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_sections(directory, name: str, env: dict, rows: list[dict], notes: list[str]) -> None:
    """{name}.json as write_results writes it (env, rows); {name}.md with one table per
    section (their columns differ)."""
    (directory / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [f"# {name}", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items())]
    lines += ["", *notes, ""]
    for sec in dict.fromkeys(r["section"] for r in rows):
        part = [{k: v for k, v in r.items() if k != "section"} for r in rows if r["section"] == sec]
        keys = list(dict.fromkeys(k for r in part for k in r))
        lines += [f"## {sec}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_short(r.get(k, "")) for k in keys) + " |" for r in part]
        lines.append("")
    (directory / f"{name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
