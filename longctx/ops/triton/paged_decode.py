"""Split-K flash-decoding over the paged KV cache (Triton), dense or DCA, CUDA-graph capturable.

A batch of B sequences with one new query token each: q [B, Hq, D]; sequence b has
context_lens[b] cached tokens (the new one included, at position context_lens[b] - 1)
reachable through block_table[b]. Returns (out [B, Hq, D], lse [Hq, B] float32 natural log):
the B query tokens are token-major like every other attention op of longctx.

Two launches with static grids (no host sync, no data-dependent shape):

    1. partial   grid (P, Hkv, B): program (p, g, b) reads keys [p*S, (p+1)*S) of sequence b
                 and kv head g once, for all Hq/Hkv query heads of that group (rows of one
                 tl.dot). Writes out_part [B, Hq, P, D] fp32 and lse_part [B, Hq, P];
                 partitions past the context write out 0, lse -inf.
    2. reduce    grid (Hq, B): log-sum-exp merge of the cdiv(context, S) non-empty partitions.

P = cdiv(max_context, S) with max_context static (by default the block table's capacity,
block_table.shape[1] * page_size), so one CUDA graph serves every context length of a
batch-size bucket. S (partition_size) is picked so that a batch of the bucket's largest
contexts spreads over about PROGRAMS_PER_SM programs per SM.

DCA decode (DESIGN.md section 2), cached length L, c = chunk_size - local_size, n = (L-1)//c:
intra = keys [n c, L) with the query at (L-1) mod c; successive = [(n-1) c, n c) at
min((L-1) mod c + c, C); inter = [0, (n-1) c) at min(2c-1, C). A partition runs the parts
its key range meets, in one online softmax. The same helpers as flash_prefill.py compute
the ranges and rotate the query in the kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longctx.ops.triton.flash_prefill import (
    LOG2E,
    DCAParams,
    _attend_tiles,
    _finish,
    _init_state,
    _load_query,
    _part_ranges,
    _yarn_row_scale,
    dtype_flags,
    interpreting,
    make_variant,
)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int


# The place to tune (benchmarks/bench_attention_gpu.py --tune sweeps alternatives). Decode is
# bandwidth-bound: a 64-key tile of a 128-wide head is 16 KiB per K or V; num_stages 3 keeps
# two K/V tiles in flight per program (70 KiB of shared memory at d=128: three programs per
# SM). Rows are contiguous along head_dim, so loads are 16-byte cp.async.
DECODE_CONFIGS: dict[int, DecodeConfig] = {
    64: DecodeConfig(block_n=64, num_warps=4, num_stages=3),
    128: DecodeConfig(block_n=64, num_warps=4, num_stages=3),
}
INTERPRET_DECODE_CONFIG = DecodeConfig(block_n=32, num_warps=4, num_stages=1)
PROGRAMS_PER_SM = 8
MIN_PARTITION = 256
MAX_PARTITION = 8192
REDUCE_BLOCK_D = 32  # head_dim slice per reduce program
REDUCE_MAX_BLOCK_P = 256  # partitions merged per loop step


def decode_config(head_dim: int) -> DecodeConfig:
    if interpreting():
        return INTERPRET_DECODE_CONFIG
    if head_dim not in DECODE_CONFIGS:
        raise ValueError(
            f"no decode config for head_dim {head_dim} (have {sorted(DECODE_CONFIGS)})"
        )
    return DECODE_CONFIGS[head_dim]


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to size partitions


def default_partition_size(
    max_context: int, batch: int, num_kv_heads: int, device: torch.device, block_n: int
) -> int:
    """Keys per partition: enough programs to fill the GPU, each with several tiles."""
    target = _num_sms(device) * PROGRAMS_PER_SM
    per_program = max(1, max_context * batch * num_kv_heads // target)
    size = triton.next_power_of_2(per_program)
    return max(MIN_PARTITION, block_n, min(MAX_PARTITION, size))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    BT,
    CTX,
    O_PART,
    LSE_PART,
    INV_FREQ,
    qk_scale,
    yarn_inv_orig,
    chunk_len,
    chunk_size,
    partition_size,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    stride_pb,
    stride_ph,
    stride_pp,
    stride_lb,
    stride_lh,
    GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    ROPE: tl.constexpr,
    DCA: tl.constexpr,
    YARN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr,
):
    # -- program set-up: one partition of one sequence, all q heads of one kv head
    part_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    ctx = tl.load(CTX + seq).to(tl.int32)
    p_lo = part_id * partition_size
    p_hi = tl.minimum(p_lo + partition_size, ctx)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GROUPS
    heads = (kv_head * GROUPS + offs_g).to(tl.int64)
    kv_off = kv_head.to(tl.int64) * stride_kh
    K += kv_off
    V += kv_off
    BT += seq.to(tl.int64) * stride_bt
    pos = ctx - 1  # the query is the newest cached token
    pos_g = pos + tl.zeros([BLOCK_G], dtype=tl.int32)
    row_scale = _yarn_row_scale(pos_g, qk_scale, yarn_inv_orig, YARN)

    # -- online softmax over the partition's keys, part by part
    acc, m_i, l_i = _init_state(BLOCK_G, HEAD_DIM)
    NUM_PARTS: tl.constexpr = 3 if DCA else 1
    for part in range(NUM_PARTS):
        lo, hi, rot = _part_ranges(part, pos, p_lo, p_hi, chunk_len, chunk_size, True, DCA)
        q = _load_query(
            Q + seq.to(tl.int64) * stride_qb,
            heads,
            g_ok,
            stride_qh,
            rot + 0 * pos_g,
            INV_FREQ,
            row_scale,
            HEAD_DIM,
            ROPE,
            FAST_TRIG,
        )
        if not UPCAST:
            q = q.to(K.dtype.element_ty)
        acc, m_i, l_i = _attend_tiles(
            acc,
            m_i,
            l_i,
            q,
            K,
            V,
            BT,
            stride_kb,
            stride_ks,
            (lo // BLOCK_N) * BLOCK_N,
            hi,
            lo,
            hi,
            lo + 0 * pos_g,
            hi + 0 * pos_g,
            True,
            True,
            PAGE_SIZE,
            BLOCK_N,
            HEAD_DIM,
            UPCAST,
            DOT_PREC,
        )

    # -- partial results: out_part [B, Hq, P, D], lse_part [B, Hq, P]
    out, lse = _finish(acc, m_i, l_i)
    offs_d = tl.arange(0, HEAD_DIM)
    base = seq.to(tl.int64) * stride_pb + heads * stride_ph + part_id * stride_pp
    tl.store(O_PART + base[:, None] + offs_d[None, :], out, mask=g_ok[:, None])
    lbase = seq.to(tl.int64) * stride_lb + heads * stride_lh + part_id
    tl.store(LSE_PART + lbase, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(
    O_PART,
    LSE_PART,
    CTX,
    Out,
    LSE,
    partition_size,
    stride_pb,
    stride_ph,
    stride_pp,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    stride_lse_h,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # one (head, sequence, BLOCK_D slice of head_dim): many small programs, so the merge of
    # a few hundred partitions is not a latency-bound loop on a handful of SMs
    head = tl.program_id(0)
    seq = tl.program_id(1)
    d_blk = tl.program_id(2)
    ctx = tl.load(CTX + seq).to(tl.int32)
    num_parts = tl.cdiv(ctx, partition_size)  # later partitions are empty
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = d_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    LSE_PART += seq.to(tl.int64) * stride_lb + head * stride_lh
    O_PART += seq.to(tl.int64) * stride_pb + head * stride_ph

    # -- pass 1: the largest partial lse
    m = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + offs_p < num_parts
        m = tl.maximum(m, tl.load(LSE_PART + p0 + offs_p, mask=ok, other=float("-inf")))
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)

    # -- pass 2: weights exp(lse_p - max), weighted sum of the partial outputs
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + offs_p < num_parts
        w = tl.exp(tl.load(LSE_PART + p0 + offs_p, mask=ok, other=float("-inf")) - m_safe)
        o = tl.load(
            O_PART + (p0 + offs_p)[:, None] * stride_pp + offs_d[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * o, 0)
        w_sum += w
    total = tl.sum(w_sum, 0)
    has_keys = total > 0.0
    out = acc / tl.where(has_keys, total, 1.0)
    tl.store(
        Out + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty)
    )
    if d_blk == 0:
        lse = tl.where(has_keys, m_safe + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
        tl.store(LSE + head * stride_lse_h + seq, lse)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def decode_workspace(
    batch: int, num_heads: int, head_dim: int, num_partitions: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_part [B, Hq, P, D], lse_part [B, Hq, P]) float32 scratch of paged_decode."""
    shape = (batch, num_heads, num_partitions)
    return (
        torch.empty((*shape, head_dim), dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.float32, device=device),
    )


def _check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride():
        raise ValueError(
            f"want q [B, Hq, D] and equal caches [blocks, page, Hkv, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, d = q.shape
    if k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"head layout mismatch: q {tuple(q.shape)}, cache {tuple(k.shape)}")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if block_table.dim() != 2 or block_table.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(f"block_table [B, max_blocks] and context_lens [B] needed for B={b}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous along head_dim")


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    rope_theta: float | None = None,
    dca: DCAParams | None = None,
    yarn_original_max: int | None = None,
    max_context: int | None = None,
    partition_size: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over the paged cache -> (out [B, Hq, D], lse [Hq, B]).

    q [B, Hq, D]; k_cache/v_cache [num_blocks, page, Hkv, D]; block_table [B, max_blocks]
    (int32/int64); context_lens [B] (cached tokens including the query's own; 0 = padding
    slot: out 0, lse -inf). rope_theta: q is unrotated, rotated in the kernel at position
    context_lens - 1 (or at its DCA positions with dca). max_context (host int, static per
    CUDA-graph bucket) bounds every context_lens[b]; default block_table.shape[1] * page.
    out/lse: optional preallocated results; workspace: optional (out_part [B, Hq, P, D],
    lse_part [B, Hq, P]) float32 buffers, P = cdiv(max_context, partition_size).
    """
    _check_decode_inputs(q, k_cache, v_cache, block_table, context_lens)
    b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    cfg = config or decode_config(d)
    max_context = max_context or block_table.shape[1] * page
    size = partition_size or default_partition_size(max_context, b, hkv, q.device, cfg.block_n)
    if size % cfg.block_n:
        raise ValueError(f"partition_size {size} must be a multiple of block_n {cfg.block_n}")
    var = make_variant(d, q.device, rope_theta, dca, yarn_original_max)
    parts = triton.cdiv(max_context, size)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((hq, b), dtype=torch.float32, device=q.device) if lse is None else lse
    if out.shape != q.shape or lse.shape != (hq, b) or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} do not fit q")
    if b == 0:
        return out, lse
    if workspace is None:
        workspace = decode_workspace(b, hq, d, parts, q.device)
    o_part, lse_part = workspace
    if o_part.shape != (b, hq, parts, d) or lse_part.shape != (b, hq, parts):
        raise ValueError(
            f"workspace shapes {tuple(o_part.shape)}, {tuple(lse_part.shape)} "
            f"do not fit B={b}, Hq={hq}, P={parts}, D={d}"
        )
    if o_part.stride(-1) != 1 or lse_part.stride(-1) != 1:
        raise ValueError("workspace buffers must be contiguous in their last dimension")
    upcast, dot_prec = dtype_flags(q.dtype)
    groups = hq // hkv
    _paged_decode_kernel[(parts, hkv, b)](
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        o_part,
        lse_part,
        var.inv_freq if var.rope else q,
        scale * LOG2E,
        var.yarn_inv_orig,
        var.dca_chunk_len,
        var.dca_chunk_size,
        size,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_table.stride(0),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        GROUPS=groups,
        BLOCK_G=max(16, triton.next_power_of_2(groups)),
        HEAD_DIM=d,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page,
        ROPE=var.rope,
        DCA=var.dca,
        YARN=var.yarn,
        UPCAST=upcast,
        DOT_PREC=dot_prec,
        FAST_TRIG=not interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    block_d = min(d, REDUCE_BLOCK_D)
    _decode_reduce_kernel[(hq, b, d // block_d)](
        o_part,
        lse_part,
        context_lens,
        out,
        lse,
        size,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        BLOCK_D=block_d,
        BLOCK_P=min(REDUCE_MAX_BLOCK_P, triton.next_power_of_2(parts)),
        num_warps=4,
    )
    return out, lse
