"""Triton attention kernels on one GPU (issue: "Triton attention kernels at the hardware limit").

  PYTHONPATH=. python benchmarks/bench_attention_gpu.py --out $OUT            # full (~2-3 min)
  PYTHONPATH=. python benchmarks/bench_attention_gpu.py --check-only          # correctness only
  PYTHONPATH=. python benchmarks/bench_attention_gpu.py --quick --out $OUT    # short smoke run
  PYTHONPATH=. python benchmarks/bench_attention_gpu.py --tune --out $OUT     # config sweep
  ... --tune --baseline DIR   # also time an earlier version (DIR/fp_orig.py, DIR/pd_orig.py)

1. Correctness first, failing loudly (exit 1): our prefill (paged, chunked, contiguous, DCA +
   YaRN; at 32K and 128K the kernels the timings run) and decode (dense, DCA, CUDA-graph
   replay) against float64 references and SDPA, at the Qwen2.5-7B head layout (28 q / 4 kv
   heads, d=128, bf16).
2. Prefill at 32K and 128K tokens, keys read from a paged cache through a shuffled block
   table (what the engine runs) with 128- and 64-token blocks (--page-size), and from
   contiguous keys: ours dense causal, ours DCA (C=262144/W=8192: no DCA effect below 254K,
   and C=32768/W=8192: all three parts), beside cuDNN SDPA, FlashAttention-2 SDPA and
   compiled FlexAttention. On an H100/H200, attention over 128-token pages (dense, and DCA:
   its parts as key ranges, one launch + LSE merge) runs the warp-specialized Gluon
   kernel (flash_prefill_ws.py); "Triton kernel" rows force the Triton one on the same inputs.
   TFLOP/s with causal flops 2*2*L*L*D*Hq/2 (DCA attends to the same causal pairs).
3. Decode at 32K..1M context (batch 1) and 128K (batch 8), one layer of KV, timed as CUDA-graph
   replays, against the copy floor: KV bytes / device-to-device copy bandwidth (read+write)
   measured in the same run.
Timings: triton.testing.do_bench / do_bench_cudagraph, median, random data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx.ops.attention import attention_with_lse  # noqa: E402
from longctx.ops.triton import (  # noqa: E402
    DecodeConfig,
    KernelConfig,
    flash_prefill,
    paged_decode,
    prefill_config,
)

HQ, HKV, D = 28, 4, 128
THETA = 1e7
DTYPE = torch.bfloat16
SCALE = D**-0.5
ORIGINAL_MAX = 262144  # Qwen2.5-1M original_max_position_embeddings


@dataclass(frozen=True)
class DCA:
    chunk_size: int
    local_size: int

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size


DCA_1M = DCA(262144, 8192)  # the Qwen2.5-1M config: no DCA effect below 253952 tokens
DCA_SMALL = DCA(32768, 8192)  # all three parts at 32K and 128K
TMA_64 = KernelConfig(128, 64, 8, 3, tma=True)  # tensor-descriptor tiles, 64-token pages
TMA_128 = KernelConfig(128, 128, 8, 2, tma=True)  # 128-key tiles, 128-token pages


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def paged(k: torch.Tensor, v: torch.Tensor, page: int, gen: torch.Generator):
    """Scatter [L, Hkv, D] keys/values into a cache with a shuffled block table."""
    n = -(-k.shape[0] // page)
    perm = torch.randperm(n + 1, generator=gen).to(k.device)
    caches = []
    for x in (k, v):
        cache = torch.zeros((n + 1, page, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded = F.pad(x, (0, 0, 0, 0, 0, n * page - x.shape[0]))
        cache[perm[:n]] = padded.view(n, page, *x.shape[1:])
        caches.append(cache)
    return caches[0], caches[1], perm[:n].contiguous()


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float64 (reference and key caching)."""
    d = x.shape[-1]
    inv = THETA ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = pos.double()[:, None] * inv
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    # Seeded from the host generator, drawn on the GPU: host randn of 128K-token tensors is slow.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    cuda_gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=cuda_gen, device="cuda", dtype=torch.float32).to(DTYPE)


# ------------------------------------------------------------------------------------------------
# float64 reference (explicit per-(query, key) DCA parts)
# ------------------------------------------------------------------------------------------------


def reference(
    q, k, v, qpos, *, dca: DCA | None = None, rotate: bool = False, yarn: int | None = None
):
    """q [Lq, Hq, D] (unrotated if rotate/dca), cached k/v [Lk, Hkv, D] (keys at 0..Lk-1),
    causal -> (out [Lq, Hq, D], lse [Hq, Lq]) float64."""
    kpos = torch.arange(k.shape[0], device=q.device)
    p, j = qpos[:, None], kpos[None, :]
    if dca is None:
        qs = [rope(q, qpos) if rotate else q.double()]
        part = torch.zeros_like(p + j)
    else:
        c = dca.chunk_len
        qs = [
            rope(q, torch.full_like(qpos, min(2 * c - 1, dca.chunk_size))),
            rope(q, torch.clamp(qpos % c + c, max=dca.chunk_size)),
            rope(q, qpos % c),
        ]
        diff = p // c - j // c
        part = torch.where(diff == 0, 2, torch.where(diff == 1, 1, 0))
    g = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(g, 1).transpose(0, 1)
    vd = v.double().repeat_interleave(g, 1).transpose(0, 1)
    s = torch.zeros((q.shape[1], q.shape[0], k.shape[0]), dtype=torch.float64, device=q.device)
    for i, qi in enumerate(qs):
        s = torch.where(part[None] == i, qi.transpose(0, 1) @ kd.transpose(1, 2), s)
    mult = torch.ones_like(qpos, dtype=torch.float64)
    if yarn:
        mult = (0.1 * torch.log((qpos.double() + 1) / yarn) + 1).clamp(min=1) ** 2
    s = (s * (SCALE * mult)[None, :, None]).masked_fill((j > p)[None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vd).transpose(0, 1), lse


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def compare(self, name: str, out, lse, ref_out, ref_lse, tol: float = 2e-2) -> None:
        """|out - ref| <= tol + tol |ref| elementwise (bf16 rounds outputs near 4 by 0.03);
        |lse - ref| <= tol where finite, and rows without keys (lse -inf) must agree."""
        diff = (out.double() - ref_out.double()).abs()
        err = diff.max().item()
        rel = (diff / ref_out.double().abs().clamp(min=1e-3)).max().item()
        within = bool((diff <= tol + tol * ref_out.double().abs()).all())
        finite = torch.isfinite(ref_lse)
        same_empty = torch.equal(torch.isfinite(lse), finite)
        lse_err = (
            (lse.double() - ref_lse.double())[finite].abs().max().item() if finite.any() else 0.0
        )
        ok = within and lse_err <= tol and same_empty and not lse.isnan().any()
        self.rows.append(
            dict(check=name, max_abs_err=err, max_rel_err=rel, lse_abs_err=lse_err, ok=ok)
        )
        print(
            f"  {'ok  ' if ok else 'FAIL'} {name}: max abs {err:.3e} (rel {rel:.3e}), "
            f"lse {lse_err:.3e}",
            flush=True,
        )

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if not r["ok"]]


def check_prefill(ch: Checks, gen: torch.Generator) -> None:
    lk, lq = 4096, 1024
    q, k, v = randn(lk, HQ, D, gen=gen), randn(lk, HKV, D, gen=gen), randn(lk, HKV, D, gen=gen)
    kc, vc, table = paged(k, v, 64, gen)
    ref = attention_with_lse(q, k, v, scale=SCALE, causal=True)  # cuDNN / flash SDPA with lse
    ch.compare(
        "prefill dense causal 4K paged(64) vs SDPA",
        *flash_prefill(q, kc, vc, block_table=table, scale=SCALE),
        *ref,
    )
    ch.compare(
        "prefill dense causal 4K contiguous vs SDPA", *flash_prefill(q, k, v, scale=SCALE), *ref
    )
    ref = attention_with_lse(q[-lq:], k, v, scale=SCALE, causal=True)
    ch.compare(
        "prefill chunk (last 1K of 4K) paged(64) vs SDPA",
        *flash_prefill(q[-lq:], kc, vc, block_table=table, q_pos0=lk - lq, scale=SCALE),
        *ref,
    )
    kc16, vc16, table16 = paged(k, v, 16, gen)
    ch.compare(
        "prefill chunk paged(16) vs SDPA",
        *flash_prefill(q[-lq:], kc16, vc16, block_table=table16, q_pos0=lk - lq, scale=SCALE),
        *ref,
    )
    for cfg, pg in ((TMA_64, 64), (TMA_128, 128)):  # tensor-descriptor K/V tiles
        kct, vct, tablet = paged(k, v, pg, gen)
        ch.compare(
            f"prefill chunk TMA {cfg} paged({pg}) vs SDPA",
            *flash_prefill(
                q[-lq:], kct, vct, block_table=tablet, q_pos0=lk - lq, scale=SCALE, config=cfg
            ),
            *ref,
        )
    n = 2048
    ref64 = reference(q[n - 512 : n], k[:n], v[:n], torch.arange(n - 512, n, device="cuda"))
    ch.compare(
        "prefill chunk vs float64 reference",
        *flash_prefill(q[n - 512 : n], kc, vc, block_table=table, q_pos0=n - 512, scale=SCALE),
        *ref64,
    )


def check_dca_prefill(ch: Checks, gen: torch.Generator) -> None:
    n, lq, dca = 2048, 768, DCA(768, 256)  # c = 512: four chunks, all three parts
    q, k_raw, v = randn(n, HQ, D, gen=gen), randn(n, HKV, D, gen=gen), randn(n, HKV, D, gen=gen)
    pos = torch.arange(n, device="cuda")
    k_dca = rope(k_raw, pos % dca.chunk_len).to(DTYPE)
    kc, vc, table = paged(k_dca, v, 64, gen)
    kw = dict(scale=SCALE, rope_theta=THETA, yarn_original_max=512)
    ref = reference(q[n - lq :], k_dca, v, pos[n - lq :], dca=dca, yarn=512)
    ch.compare(
        "DCA prefill chunk (c=512, YaRN) vs float64 reference",
        *flash_prefill(q[n - lq :], kc, vc, block_table=table, q_pos0=n - lq, dca=dca, **kw),
        *ref,
    )
    kct, vct, tablet = paged(k_dca, v, 128, gen)
    ch.compare(
        f"DCA prefill chunk TMA {TMA_128} paged(128) vs float64 reference",
        *flash_prefill(
            q[n - lq :], kct, vct, block_table=tablet, q_pos0=n - lq, dca=dca, config=TMA_128, **kw
        ),
        *ref,
    )
    ch.compare(
        "DCA prefill chunk paged(128), Hopper kernel where it runs, vs float64 reference",
        *flash_prefill(q[n - lq :], kct, vct, block_table=tablet, q_pos0=n - lq, dca=dca, **kw),
        *ref,
    )
    k_rot = rope(k_raw, pos).to(DTYPE)
    kc, vc, table = paged(k_rot, v, 64, gen)
    dense = flash_prefill(q, kc, vc, block_table=table, **kw)
    ch.compare(
        "DCA with chunk >= length == dense causal (kernel vs kernel)",
        *flash_prefill(q, kc, vc, block_table=table, dca=DCA(4096, 512), **kw),
        *dense,
        tol=1e-3,
    )
    ch.compare(
        "dense prefill with in-kernel RoPE vs float64 reference",
        *dense,
        *reference(q, k_rot, v, pos, rotate=True, yarn=512),
    )


def check_long_prefill(ch: Checks, gen: torch.Generator) -> None:
    """At the timed sizes, the kernels the timings run (128-token pages): dense against SDPA,
    DCA with all three parts against the Triton kernel (checked against float64 above)."""
    for length in (32768, 131072):
        q, k, v = (randn(length, h, D, gen=gen) for h in (HQ, HKV, HKV))
        kc, vc, table = paged(k, v, 128, gen)
        ch.compare(
            f"prefill dense causal {length // 1024}K paged(128) vs SDPA",
            *flash_prefill(q, kc, vc, block_table=table, scale=SCALE),
            *attention_with_lse(q, k, v, scale=SCALE, causal=True),
        )
        kw = dict(block_table=table, scale=SCALE, rope_theta=THETA, dca=DCA_SMALL)
        kw.update(yarn_original_max=ORIGINAL_MAX)
        ch.compare(
            f"DCA C=32768 prefill {length // 1024}K paged(128) vs the Triton kernel",
            *flash_prefill(q, kc, vc, **kw),
            *flash_prefill(q, kc, vc, config=prefill_config(D, 128), **kw),
        )
        del q, k, v, kc, vc
        torch.cuda.empty_cache()


def check_decode(ch: Checks, gen: torch.Generator) -> None:
    lens, page, dca = [1, 1000, 4097, 20000], 64, DCA(8192, 2048)  # c = 6144: 20000 has 3 parts
    for variant in ("dense", "dca"):
        use_dca = variant == "dca"
        ks = [randn(n, HKV, D, gen=gen) for n in lens]
        vs = [randn(n, HKV, D, gen=gen) for n in lens]
        if use_dca:
            ks = [
                rope(k, torch.arange(k.shape[0], device="cuda") % dca.chunk_len).to(DTYPE)
                for k in ks
            ]
        q = randn(len(lens), HQ, D, gen=gen)
        kc, vc, table, ctx = batch_cache(ks, vs, page, gen)
        kw = dict(scale=SCALE)
        if use_dca:
            kw.update(rope_theta=THETA, dca=dca, yarn_original_max=4096)
        out, lse = paged_decode(q, kc, vc, table, ctx, **kw)
        refs = [
            reference(
                q[i : i + 1],
                ks[i],
                vs[i],
                torch.tensor([n - 1], device="cuda"),
                dca=dca if use_dca else None,
                yarn=4096 if use_dca else None,
            )
            for i, n in enumerate(lens)
        ]
        ref = (torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs], 1))
        ch.compare(f"decode {variant} ragged {lens} vs float64 reference", out, lse, *ref)
        check_decode_graph(ch, variant, q, kc, vc, table, ctx, kw)


def check_decode_graph(ch: Checks, variant, q, kc, vc, table, ctx, kw) -> None:
    """Capture once at a static bucket (max_context), replay with other context lengths."""
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
        f"decode {variant} CUDA-graph replay with new lengths vs eager", out, lse, *ref, tol=1e-6
    )


def batch_cache(ks, vs, page, gen):
    """One paged cache holding several sequences, shuffled blocks."""
    need = [-(-k.shape[0] // page) for k in ks]
    perm = torch.randperm(sum(need) + 1, generator=gen).to("cuda")
    kc = torch.zeros((sum(need) + 1, page, HKV, D), dtype=DTYPE, device="cuda")
    vc = torch.zeros_like(kc)
    table = torch.zeros((len(ks), max(need)), dtype=torch.int64, device="cuda")
    start = 0
    for i, (k, v) in enumerate(zip(ks, vs)):
        blocks = perm[start : start + need[i]]
        start += need[i]
        table[i, : need[i]] = blocks
        for cache, x in ((kc, k), (vc, v)):
            padded = F.pad(x, (0, 0, 0, 0, 0, need[i] * page - x.shape[0]))
            cache[blocks] = padded.view(need[i], page, HKV, D)
    ctx = torch.tensor([k.shape[0] for k in ks], device="cuda")
    return kc, vc, table, ctx


def run_checks() -> Checks:
    print("== correctness (bf16, 28 q / 4 kv heads, d=128)", flush=True)
    ch, gen = Checks(), torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    for fn in (check_prefill, check_dca_prefill, check_long_prefill, check_decode):
        try:
            fn(ch, gen)
        except Exception as e:  # a crash is a failed check, reported with the others
            ch.rows.append(
                dict(check=f"{fn.__name__} raised {type(e).__name__}: {e}"[:300], ok=False)
            )
            print(f"  FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
    return ch


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object], expected_ms: float = 1.0, rep: float = 100.0) -> float:
    import triton

    fn()  # compile / warm up
    torch.cuda.synchronize()
    rep = max(rep, 4 * expected_ms)
    return triton.testing.do_bench(fn, warmup=max(25.0, expected_ms), rep=rep, return_mode="median")


def causal_tflops(length: int, ms: float) -> float:
    return 2 * 2 * length * length * D * HQ / 2 / (ms * 1e-3) / 1e12


def sdpa_fn(backend, q, k, v) -> tuple[Callable[[], object], str]:
    """SDPA with the given backend; native GQA when it runs, else K/V expanded to Hq heads."""
    from torch.nn.attention import sdpa_kernel

    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))

    def native():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)

    try:
        native()
        return native, "gqa"
    except RuntimeError:
        ke, ve = (x.repeat_interleave(HQ // HKV, 1) for x in (kh, vh))

        def expanded():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, ke, ve, is_causal=True)

        return expanded, "kv expanded"


def flex_fn(q, k, v) -> tuple[Callable[[], object], str]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    length = q.shape[0]
    mask = create_block_mask(
        lambda b, h, qi, ki: qi >= ki, None, None, length, length, device="cuda", _compile=True
    )
    flex = torch.compile(flex_attention, dynamic=False)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    return partial(flex, qh, kh, vh, block_mask=mask, enable_gqa=True), "gqa, causal block mask"


def bench_prefill(lengths: list[int], pages: list[int], with_flex: bool, quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    for length in lengths:
        rows += prefill_at(length, pages, with_flex, quick, gen)
        torch.cuda.empty_cache()
    return rows


def prefill_at(
    length: int, pages: list[int], with_flex: bool, quick: bool, gen: torch.Generator
) -> list[dict]:
    """Ours (dense, DCA) for each KV block size (each with its default tile config) and
    contiguous keys, beside the SDPA / Flex baselines, on the same inputs."""
    from torch.nn.attention import SDPBackend

    print(f"== prefill {length // 1024}K", flush=True)
    q, k, v = (randn(length, h, D, gen=gen) for h in (HQ, HKV, HKV))
    expect = causal_tflops(length, 1.0) / 400  # ms at 400 TFLOP/s
    dkw = dict(rope_theta=THETA, yarn_original_max=ORIGINAL_MAX)
    ours = [("ours dense contiguous", partial(flash_prefill, q, k, v, scale=SCALE))]
    for page in pages:
        kc, vc, table = paged(k, v, page, gen)
        pkw = dict(block_table=table, scale=SCALE)
        ours += [
            (f"ours dense paged({page})", partial(flash_prefill, q, kc, vc, **pkw)),
            (
                f"ours dense paged({page}), Triton kernel",
                partial(flash_prefill, q, kc, vc, config=prefill_config(D, page), **pkw),
            ),
            (
                f"ours DCA C=262144 W=8192 paged({page})",
                partial(flash_prefill, q, kc, vc, dca=DCA_1M, **pkw, **dkw),
            ),
            (
                f"ours DCA C=32768 W=8192 paged({page})",
                partial(flash_prefill, q, kc, vc, dca=DCA_SMALL, **pkw, **dkw),
            ),
            (
                f"ours DCA C=32768 W=8192 paged({page}), Triton kernel",
                partial(
                    flash_prefill,
                    q,
                    kc,
                    vc,
                    dca=DCA_SMALL,
                    config=prefill_config(D, page),
                    **pkw,
                    **dkw,
                ),
            ),
        ]
    rows = [
        prefill_row(name, length, fn, expect)
        for name, fn in ours
        if not (quick and "contiguous" in name)
    ]
    for name, backend in (
        ("cuDNN SDPA", SDPBackend.CUDNN_ATTENTION),
        ("FlashAttention-2 SDPA", SDPBackend.FLASH_ATTENTION),
    ):
        rows.append(baseline_row(name, length, partial(sdpa_fn, backend, q, k, v), expect))
    if with_flex:
        rows.append(
            baseline_row("FlexAttention (compiled)", length, partial(flex_fn, q, k, v), expect)
        )
    return rows


def prefill_row(
    name: str, length: int, fn, expect: float, note: str = "", rep: float = 100.0
) -> dict:
    try:
        ms = bench_ms(fn, expect, rep)
        row = dict(
            kind="prefill",
            name=name,
            tokens=length,
            ms=ms,
            tflops=causal_tflops(length, ms),
            note=note,
        )
    except Exception as e:  # keep going: one failing baseline must not hide the others
        row = dict(kind="prefill", name=name, tokens=length, note=f"error: {e}"[:200])
    print(
        f"  {name}: {row.get('ms', float('nan')):.2f} ms, "
        f"{row.get('tflops', float('nan')):.0f} TFLOP/s {row['note']}",
        flush=True,
    )
    return row


def baseline_row(name: str, length: int, make, expect: float) -> dict:
    try:
        fn, note = make()
    except Exception as e:
        row = dict(kind="prefill", name=name, tokens=length, note=f"error: {e}"[:200])
        print(f"  {name}: {row['note']}", flush=True)
        return row
    return prefill_row(name, length, fn, expect, note)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(partial(dst.copy_, src), return_mode="median")
    return 2 * 2**30 / (ms * 1e-3)


@dataclass
class DecodeSetup:
    """One layer's paged cache holding the largest batch x context, shuffled blocks."""

    kc: torch.Tensor
    vc: torch.Tensor
    perm: torch.Tensor

    @classmethod
    def make(cls, tokens: int, page: int, gen: torch.Generator) -> DecodeSetup:
        blocks = tokens // page + 1
        kc = torch.empty((blocks, page, HKV, D), dtype=DTYPE, device="cuda").normal_()
        return cls(
            kc, torch.empty_like(kc).normal_(), torch.randperm(blocks, generator=gen).to("cuda")
        )


def bench_decode(
    cases: list[tuple[int, int]],
    page: int,
    bw: float,
    config: DecodeConfig | None = None,
    dca_too: bool = True,
    partition_size: int | None = None,
    label: str = "",
) -> list[dict]:
    """cases: (batch, context), each timed as CUDA-graph replays and eagerly."""
    gen = torch.Generator().manual_seed(2)
    setup = DecodeSetup.make(max(b * n for b, n in cases), page, gen)
    variants = {label or "ours decode dense": dict(scale=SCALE)}
    if dca_too:
        variants["ours decode DCA C=262144 W=8192"] = dict(
            scale=SCALE, rope_theta=THETA, dca=DCA_1M, yarn_original_max=ORIGINAL_MAX
        )
    rows = []
    for batch, ctx in cases:
        for name, kw in variants.items():
            rows.append(
                decode_row(
                    name,
                    batch,
                    ctx,
                    setup,
                    gen,
                    bw,
                    dict(config=config, partition_size=partition_size, **kw),
                )
            )
    return rows


def decode_row(
    name: str, batch: int, ctx: int, setup: DecodeSetup, gen: torch.Generator, bw: float, kw: dict
) -> dict:
    page = setup.kc.shape[1]
    n = ctx // page
    table = setup.perm[: batch * n].view(batch, n).contiguous()
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
    q = randn(batch, HQ, D, gen=gen)
    fn = partial(paged_decode, q, setup.kc, setup.vc, table, lens, **kw)
    return decode_timing(name, batch, ctx, fn, bw)


def decode_timing(name: str, batch: int, ctx: int, fn, bw: float) -> dict:
    import triton

    try:
        fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        eager = triton.testing.do_bench(fn, return_mode="median")
    except Exception as e:  # one failing candidate must not hide the others
        print(f"  {name} B={batch} ctx={ctx // 1024}K: error {e}"[:300], flush=True)
        return dict(kind="decode", name=name, batch=batch, tokens=ctx, note=f"error: {e}"[:200])
    kv_bytes = batch * ctx * HKV * D * 2 * 2  # bf16 K and V
    floor_ms = kv_bytes / bw * 1e3
    print(
        f"  {name} B={batch} ctx={ctx // 1024}K: graph {ms * 1e3:.1f} us "
        f"(eager {eager * 1e3:.1f} us), {kv_bytes / ms / 1e9:.2f} TB/s of KV, "
        f"floor {floor_ms * 1e3:.1f} us -> {floor_ms / ms:.2f}x floor",
        flush=True,
    )
    return dict(
        kind="decode",
        name=name,
        batch=batch,
        tokens=ctx,
        ms=ms,
        eager_ms=eager,
        kv_tb_s=kv_bytes / (ms * 1e-3) / 1e12,
        floor_ms=floor_ms,
        vs_floor=floor_ms / ms,
    )


# ------------------------------------------------------------------------------------------------
# tuning sweep (--tune): candidate configs beside the shipped ones, and with --baseline DIR the
# kernels of an earlier version (DIR/fp_orig.py, DIR/pd_orig.py), all on this card in one run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One kernel variant to time. mode: prefill dense | rope | dca1m | dca32k; decode
    dense | dca. config: a (new or baseline) KernelConfig / DecodeConfig; None = default."""

    kind: str
    name: str
    mode: str = "dense"
    config: object = None
    page: int = 64
    old: bool = False


TUNE_PREFILL_LEN = 32768
TUNE_DECODE_CASES = [(1, 32768), (1, 131072), (1, 1048576), (8, 131072)]


def prefill_candidates() -> list[Candidate]:
    """The shipped configs for 64- and 128-token pages, per mode, and close alternatives
    (call 1 of attention_tuning_notes.md ruled out BLOCK_M 64 and pointer-loaded 128-key tiles)."""
    kc = KernelConfig
    tma64, tma128 = kc(128, 64, 8, 3, tma=True), kc(128, 128, 8, 3, tma=True)
    runs = [
        ("dense", tma64, 64),
        ("dense", tma128, 128),
        ("rope", tma64, 64),
        ("rope", tma128, 128),
        ("dca1m", tma64, 64),
        ("dca1m", tma128, 128),
        ("dca1m", kc(128, 128, 8, 2, tma=True), 128),
        ("dca32k", tma64, 64),
        ("dca32k", tma128, 128),
    ]
    return [Candidate("prefill", f"{m} {c} paged({pg})", m, c, pg) for m, c, pg in runs]


def decode_candidates() -> list[Candidate]:
    dc = DecodeConfig
    configs = [dc(64, 4, 3, 2), dc(64, 4, 3, 1), dc(64, 4, 4, 2), dc(32, 2, 4, 2)]
    return [Candidate("decode", f"decode {c}", "both", c) for c in configs]


def baseline_candidates() -> list[Candidate]:
    return [
        Candidate("prefill", "OLD dense default paged(64)", "dense", None, 64, old=True),
        Candidate("prefill", "OLD DCA C=262144 default paged(64)", "dca1m", None, 64, old=True),
        Candidate("decode", "OLD decode default", "both", None, 64, old=True),
    ]


def _ops(old: bool, baseline: str | None):
    """(flash_prefill, paged_decode) of this tree or of the --baseline directory."""
    if not old:
        return flash_prefill, paged_decode
    import importlib

    sys.path.insert(0, baseline)
    fp_orig, pd_orig = importlib.import_module("fp_orig"), importlib.import_module("pd_orig")
    return fp_orig.flash_prefill, pd_orig.paged_decode


def _mode_kwargs(mode: str) -> dict:
    dca = {"dca1m": DCA_1M, "dca32k": DCA_SMALL}.get(mode)
    if mode == "dense":
        return {}
    kw = dict(rope_theta=THETA)
    if dca is not None:
        kw.update(dca=dca, yarn_original_max=ORIGINAL_MAX)
    return kw


def prefill_inputs(page: int):
    """(q, k, v, k_cache, v_cache, block_table) at TUNE_PREFILL_LEN, the same for every call."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn(TUNE_PREFILL_LEN, h, D, gen=gen) for h in (HQ, HKV, HKV))
    kc, vc, table = paged(k, v, page, gen)
    return q, k, v, kc, vc, table


def prefill_call(c: Candidate, inputs, baseline: str | None):
    fp_fn = _ops(c.old, baseline)[0]
    q, _, _, kc, vc, table = inputs
    kw = dict(block_table=table, scale=SCALE, **_mode_kwargs(c.mode))
    if c.config is not None:
        kw["config"] = c.config
    return partial(fp_fn, q, kc, vc, **kw)


def decode_calls(c: Candidate, setup: DecodeSetup, baseline: str | None):
    """[(label, batch, ctx, fn)] of a decode candidate over TUNE_DECODE_CASES x modes."""
    pd_fn = _ops(c.old, baseline)[1]
    gen = torch.Generator().manual_seed(4)
    calls = []
    for batch, ctx in TUNE_DECODE_CASES:
        n = ctx // setup.kc.shape[1]
        table = setup.perm[: batch * n].view(batch, n).contiguous()
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
        q = randn(batch, HQ, D, gen=gen)
        for mode in ("dense", "dca1m"):
            kw = dict(scale=SCALE, **_mode_kwargs(mode))
            if c.config is not None:
                kw["config"] = c.config
            label = f"{c.name} {'DCA' if mode != 'dense' else 'dense'}"
            calls.append(
                (label, batch, ctx, partial(pd_fn, q, setup.kc, setup.vc, table, lens, **kw))
            )
    return calls


def _warm(job: tuple[Candidate, str | None]) -> str:
    """Worker: compile a candidate by running it once (fills Triton's disk cache)."""
    c, baseline = job
    try:
        if c.kind == "prefill":
            prefill_call(c, prefill_inputs(c.page), baseline)()
        else:
            setup = DecodeSetup.make(
                max(b * n for b, n in TUNE_DECODE_CASES), c.page, torch.Generator()
            )
            for *_, fn in decode_calls(c, setup, baseline):
                fn()
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # reported, and the candidate is skipped
        return f"{c.name}: {type(e).__name__}: {e}"[:400]


def warm_all(cands: list[Candidate], baseline: str | None):
    """Compile every candidate in parallel processes (one GPU, many CPU cores); returns the
    pool's AsyncResult so that the caller can run the correctness checks meanwhile."""
    import multiprocessing as mp
    import os

    pool = mp.get_context("spawn").Pool(min(len(cands), max(1, (os.cpu_count() or 2) - 1)))
    return pool, pool.map_async(_warm, [(c, baseline) for c in cands], chunksize=1)


def tune(args, bw: float, cands: list[Candidate]) -> list[dict]:
    rows = []
    by_page: dict[int, tuple] = {}
    reference: dict[str, torch.Tensor] = {}
    for c in [c for c in cands if c.kind == "prefill"]:
        if c.page not in by_page:
            by_page = {c.page: prefill_inputs(c.page)}  # one set of inputs at a time
            torch.cuda.empty_cache()
        fn = prefill_call(c, by_page[c.page], args.baseline)
        out = fn()[0]
        ref = reference.setdefault(c.mode, out)
        err = (out.float() - ref.float()).abs().max().item()
        note = f"max |out - first {c.mode} candidate| {err:.2e}" + (
            " MISMATCH" if err > 2e-2 else ""
        )
        rows.append(prefill_row(f"tune {c.name}", TUNE_PREFILL_LEN, fn, 20.0, note, rep=300.0))
    from torch.nn.attention import SDPBackend

    q, k, v = by_page[next(iter(by_page))][:3]
    make = partial(sdpa_fn, SDPBackend.CUDNN_ATTENTION, q, k, v)
    rows.append(baseline_row("cuDNN SDPA", TUNE_PREFILL_LEN, make, 20.0))
    del by_page, reference, q, k, v
    torch.cuda.empty_cache()
    setup = DecodeSetup.make(
        max(b * n for b, n in TUNE_DECODE_CASES), 64, torch.Generator().manual_seed(2)
    )
    first: dict[tuple, torch.Tensor] = {}
    for c in [c for c in cands if c.kind == "decode"]:
        for label, batch, ctx, fn in decode_calls(c, setup, args.baseline):
            out = fn()[0]
            ref = first.setdefault((label.split()[-1], batch, ctx), out)
            err = (out.float() - ref.float()).abs().max().item()
            row = decode_timing(label, batch, ctx, fn, bw)
            row["note"] = f"max |out - first| {err:.2e}" + (" MISMATCH" if err > 2e-2 else "")
            rows.append(row)
    rows += host_overhead(args.baseline)
    summary(rows)
    return rows


def summary(rows: list[dict]) -> None:
    """The short table printed last (the device tool returns the end of the output)."""
    print("== summary", flush=True)
    for r in rows:
        if r["kind"] == "prefill":
            name, tflops = r["name"].removeprefix("tune "), r.get("tflops", float("nan"))
            print(f"P {tflops:6.0f} TF/s  {name:60s} {r.get('note', '')[:40]}")
        elif r["kind"] == "decode":
            us = r.get("ms", float("nan")) * 1e3
            ratio = r.get("vs_floor", float("nan"))
            note = r.get("note", "")[-8:] if "MISMATCH" in r.get("note", "") else ""
            print(f"D {ratio:5.2f}x {us:7.1f}us  {r['name']} {r['tokens'] // 1024}K {note}")
        elif r["kind"] == "host":
            print(f"H {r['us_per_call']:6.1f} us  {r['name']}")


def host_overhead(baseline: str | None) -> list[dict]:
    """Host cost of one eager wrapper call at a tiny size (GPU time ~10 us): calls issued
    back to back without syncs, wall time per call (the host is the bottleneck there)."""
    import time as _time

    gen = torch.Generator().manual_seed(5)
    setup = DecodeSetup.make(4096, 64, gen)
    table = setup.perm[:16].view(1, 16).contiguous()
    lens = torch.full((1,), 1000, device="cuda", dtype=torch.int64)
    q = randn(1, HQ, D, gen=gen)
    rows = []
    for old in (False, True) if baseline else (False,):
        pd_fn = _ops(old, baseline)[1]
        for mode in ("dense", "dca1m"):
            fn = partial(
                pd_fn, q, setup.kc, setup.vc, table, lens, scale=SCALE, **_mode_kwargs(mode)
            )
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            n = 300
            t0 = _time.perf_counter()
            for _ in range(n):
                fn()
            t1 = _time.perf_counter()
            torch.cuda.synchronize()
            name = f"{'OLD ' if old else ''}paged_decode eager host us/call B=1 ctx=1000 {mode}"
            us = (t1 - t0) / n * 1e6
            print(f"  {name}: {us:.1f} us", flush=True)
            rows.append(dict(kind="host", name=name, us_per_call=us))
    return rows


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=None, help="result directory (default $OUT or benchmarks/results)"
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--check-only", action="store_true", help="correctness checks only")
    ap.add_argument("--tune", action="store_true", help="sweep kernel configs instead of baselines")
    ap.add_argument(
        "--page-size",
        type=int,
        nargs="+",
        default=[128, 64],
        help="KV block sizes (tokens) to time prefill at; decode uses the first",
    )
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compile time)")
    ap.add_argument(
        "--baseline",
        default=None,
        help="with --tune: directory holding an earlier version's fp_orig.py / pd_orig.py",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    env = environment()
    env["page_size"] = args.page_size
    print(
        f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}",
        flush=True,
    )
    started = time.time()
    directory = out_dir(args.out)
    cands = []
    if args.tune:  # compile the candidates in other processes while the checks run
        cands = prefill_candidates() + decode_candidates()
        cands += baseline_candidates() if args.baseline else []
        pool, warming = warm_all(cands, args.baseline)
    checks = run_checks()
    verdict = "CORRECTNESS FAILED: " + ", ".join(checks.failed) if checks.failed else "all passed"
    write_results(directory, "attention_gpu_checks", env, checks.rows, verdict)
    if checks.failed and not args.tune:  # a sweep goes on: each candidate is checked itself
        sys.exit(verdict)
    if args.check_only:
        return
    if args.tune:
        errors = warming.get()
        pool.close()
        pool.join()
        for e in filter(None, errors):
            print(f"  compile failed, skipped: {e}", flush=True)
        cands = [c for c, e in zip(cands, errors) if not e]
        print(f"== candidates compiled ({time.time() - started:.0f} s)", flush=True)
    rows = timings(args, cands)
    env["wall_s"] = round(time.time() - started, 1)
    write_results(
        directory, "attention_gpu_tune" if args.tune else "attention_gpu", env, rows, notes(args)
    )


def timings(args, cands: list[Candidate]) -> list[dict]:
    bw = copy_bandwidth()
    print(f"== device copy bandwidth (read+write): {bw / 1e12:.2f} TB/s", flush=True)
    rows = [dict(kind="copy", name="device-to-device copy", tb_s=bw / 1e12)]
    if args.tune:
        return rows + tune(args, bw, cands)
    lengths = [32768] if args.quick else [32768, 131072]
    rows += bench_prefill(lengths, args.page_size, not (args.quick or args.no_flex), args.quick)
    print("== decode (one layer, CUDA-graph replay)", flush=True)
    cases = (
        [(1, 131072), (1, 1048576)]
        if args.quick
        else [(1, 32768), (1, 131072), (1, 524288), (1, 1048576), (8, 131072)]
    )
    return rows + bench_decode(cases, args.page_size[0], bw)


def notes(args) -> str:
    return (
        f"Qwen2.5-7B attention layout: {HQ} q / {HKV} kv heads, d={D}, {DTYPE}; "
        f"paged KV block sizes {args.page_size} (prefill; decode at {args.page_size[0]}), each "
        "with its default tile config (128-key TMA tiles where a block holds whole tiles); "
        "prefill TFLOP/s = 2*2*L*L*D*Hq/2 / time; "
        f"decode floor = KV bytes / copy bandwidth (read+write), vs_floor = floor / time; "
        f"DCA C=262144 has no DCA effect below 253952 tokens; C=32768 runs all three parts. "
        "Median of triton.testing.do_bench (decode: do_bench_cudagraph). "
        "Correctness checks (attention_gpu_checks.md) passed before timing."
    )


if __name__ == "__main__":
    main()
