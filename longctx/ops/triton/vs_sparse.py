"""Vertical-slash sparse attention over the paged KV cache (Triton): MInference's kernel, with
slash runs merged per head, DCA parts in one online softmax, and 64-bit offsets.

Input: the queries of one prefill segment, one rotated copy per key part, q [P, n, Hq, D]
(row i at absolute position q_pos0 + i); keys/values in the paged cache
[num_blocks, page, Hkv, D] through one block table; a SegmentIndex (longctx/sparse/convert.py)
built with this kernel's BLOCK_M / BLOCK_N. Output (out [n, Hq, D], lse [Hq, n] natural log).

Program (q head, query block), blocks latest-first; the q heads of one KV group are
neighbouring programs, so their K/V tiles meet in L2. For each part p (keys [lo, hi), causal
or not), with that part's query rotation:

    loop 1  slash tiles k in tile_range[p, h, b]: keys [m0 - o_k, min(m0 - o_k + BN, m0 + BM - e_k))
            -- BN consecutive key positions, any alignment (a tile may straddle two cache pages)
    loop 2  columns[p, h, b, :count], BN at a time (a gather of single keys)

All parts share one online softmax (exp2, scale folded with log2 e): that is exactly the
log-sum-exp merge of the parts' attentions. Masks cost only where needed: a slash tile is
masked when it crosses the part's start, its run's end or the causal bound of the block's first
row; column tiles always are. Each iteration loads the next tile's index entries and block-table
pages ahead, so K/V addresses never wait on a load of the same iteration (the pipeliner can
then keep several tiles in flight). Rows without any key get out = 0, lse = -inf.

FP8 cache (k_scale / v_scale [num_blocks, page, Hkv] float32 given; KV_FP8 constexpr): fp8
K/V rows converted to the dot dtype (fp16 for bf16 queries), each key's logits times its k
scale plus the row's q . k_zero (keys are stored relative to a zero point), P times the v
scale before P @ V (flash_prefill.py's module doc).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longctx.ops.triton.flash_prefill import (
    LOG2E,
    _fp8_pv,
    _fp8_query,
    _key_zero_bias,
    check_kv_dtypes,
    dtype_flags,
    interpreting,
    key_zero_point,
)
from longctx.sparse.convert import SegmentIndex


@dataclass(frozen=True)
class SparseKernelConfig:
    """Tile sizes and launch options; the SegmentIndex must be built with the same blocks."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# sm_90, d=128: 64 x 128 query tile + (K + V) 64 x 128 bf16 tiles per stage (32 KiB), as
# MInference's kernel, three stages deep (H100, 256K, benchmarks/results/sparse_gpu_configs.md:
# 8-9% faster than two on both fixed patterns); benchmarks/bench_sparse_gpu.py's config sweep
# compares alternatives.
SPARSE_CONFIGS: dict[int, SparseKernelConfig] = {
    64: SparseKernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    128: SparseKernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
}
# The interpreter's cost is programs x iterations; small blocks keep test edges dense.
INTERPRET_SPARSE_CONFIG = SparseKernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


def sparse_config(head_dim: int) -> SparseKernelConfig:
    if interpreting():
        return INTERPRET_SPARSE_CONFIG
    if head_dim not in SPARSE_CONFIGS:
        raise ValueError(
            f"no sparse config for head_dim {head_dim} (have {sorted(SPARSE_CONFIGS)})"
        )
    return SPARSE_CONFIGS[head_dim]


@triton.jit
def _cache_rows(BT, offs, ok, stride_kb, stride_ks, PAGE_SIZE: tl.constexpr):
    """Element offsets (int64) of the cache rows of key positions offs (masked: 0)."""
    page = tl.load(BT + offs // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
    return page * stride_kb + (offs % PAGE_SIZE).to(tl.int64) * stride_ks


@triton.jit
def _attend(
    acc,
    m_i,
    l_i,
    q,
    q_bias,
    K,
    V,
    K_SCALE,
    V_SCALE,
    BT,
    rows,
    offs,
    key_ok,
    row_hi,
    need_mask,
    stride_sb,
    stride_ss,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One online-softmax step over BLOCK_N keys at positions offs, cache rows `rows`. An fp8
    cache's scales are addressed here (the block-table entries again: L1 hits), so the
    other caches' loops carry nothing more."""
    ptrs = rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    if KV_FP8:
        s_rows = _cache_rows(BT, offs, key_ok, stride_sb, stride_ss, PAGE_SIZE)
    k = tl.load(K + ptrs, mask=key_ok[:, None], other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    elif UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if KV_FP8:
        k_sc = tl.load(K_SCALE + s_rows, mask=key_ok, other=0.0)
        qk = qk * k_sc[None, :] + q_bias[:, None]  # k = stored * k_sc + zero (q_bias = q . zero)
    if need_mask:
        seen = key_ok[None, :] & (offs[None, :] < row_hi[:, None])
        qk = tl.where(seen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(V + ptrs, mask=key_ok[:, None], other=0.0)
    if KV_FP8:  # P times each key's v scale (relative to the tile's largest), l keeps plain p
        v_sc = tl.load(V_SCALE + s_rows, mask=key_ok, other=0.0)
        acc = _fp8_pv(acc, p, v, v_sc, q.dtype, DOT_PREC)
    else:
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _tile_keys(TO, TE, t, t_end, m0, lo, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key span [start, end) of slash tile t (empty when t >= t_end)."""
    live = t < t_end
    o = tl.load(TO + t, mask=live, other=0)
    e = tl.load(TE + t, mask=live, other=0)
    start = m0 - o
    end = tl.minimum(tl.minimum(start + BLOCK_N, m0 + BLOCK_M - e), hi)
    end = tl.where(live, end, start)
    return start, end


# Integers that change from one prefill chunk to the next (positions, row counts, the index's
# shapes) are not specialized on: each new divisibility pattern would otherwise compile the
# kernel again in the middle of a long prompt (~1 s each; seen with DCA and 32K chunks).
_PER_CHUNK_INTS = [
    "q_pos0", "n_rows", "stride_qp", "stride_tp", "stride_th", "stride_rp", "stride_rh",
    "stride_cp", "stride_ch", "stride_cb", "stride_np", "stride_nh",
]  # fmt: skip


@triton.jit(do_not_specialize=_PER_CHUNK_INTS)
def _vs_sparse_kernel(
    Q,
    K,
    V,
    K_SCALE,
    V_SCALE,
    K_ZERO,
    BT,
    Out,
    LSE,
    TILE_O,
    TILE_E,
    TILE_RANGE,
    COLS,
    COL_CNT,
    PART,
    q_pos0,
    n_rows,
    qk_scale,
    stride_qp,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_sb,
    stride_ss,
    stride_sh,
    stride_ot,
    stride_oh,
    stride_lh,
    stride_tp,
    stride_th,
    stride_rp,
    stride_rh,
    stride_cp,
    stride_ch,
    stride_cb,
    stride_np,
    stride_nh,
    NUM_PARTS: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # -- program set-up: one q head, one query block (latest first)
    head = tl.program_id(0).to(tl.int64)
    blk = (tl.num_programs(1) - 1 - tl.program_id(1)).to(tl.int64)
    offs_m = blk.to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_rows
    pos = q_pos0 + offs_m
    m0 = q_pos0 + blk.to(tl.int32) * BLOCK_M
    kv_off = (head // GROUPS) * stride_kh
    Kh = K + kv_off
    Vh = V + kv_off
    if KV_FP8:
        s_off = (head // GROUPS) * stride_sh
        K_SCALE += s_off
        V_SCALE += s_off
        K_ZERO += (head // GROUPS) * HEAD_DIM
    rows = offs_m.to(tl.int64)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite floor: masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for part in range(NUM_PARTS):
        p64 = tl.zeros([], dtype=tl.int64) + part
        lo = tl.load(PART + p64 * 3)
        hi = tl.load(PART + p64 * 3 + 1)
        causal = tl.load(PART + p64 * 3 + 2) != 0
        row_hi = tl.where(causal, tl.minimum(pos + 1, hi), hi)
        hi_all = tl.where(causal, tl.minimum(m0 + 1, hi), hi)  # keys every row of the block sees
        q_ptrs = Q + p64 * stride_qp + rows[:, None] * stride_qt + head * stride_qh
        q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q = q * qk_scale
        if not UPCAST:
            q = q.to(Q.dtype.element_ty)
        q_bias = 0.0
        if KV_FP8:
            q_bias = _key_zero_bias(q, K_ZERO, HEAD_DIM)
            q = _fp8_query(q)

        # -- loop 1: slash tiles, the next tile's span and pages read one iteration ahead
        TO = TILE_O + p64 * stride_tp + head * stride_th
        TE = TILE_E + p64 * stride_tp + head * stride_th
        rng = TILE_RANGE + p64 * stride_rp + head * stride_rh + blk * 2
        t_lo = tl.load(rng)
        t_hi = tl.load(rng + 1)
        start, end = _tile_keys(TO, TE, t_lo, t_hi, m0, lo, hi, BLOCK_M, BLOCK_N)
        offs = start + offs_n
        key_ok = (offs >= lo) & (offs < end)
        kr = _cache_rows(BT, offs, key_ok, stride_kb, stride_ks, PAGE_SIZE)
        for t in range(t_lo, t_hi):
            n_start, n_end = _tile_keys(TO, TE, t + 1, t_hi, m0, lo, hi, BLOCK_M, BLOCK_N)
            n_offs = n_start + offs_n
            n_ok = (n_offs >= lo) & (n_offs < n_end)
            n_kr = _cache_rows(BT, n_offs, n_ok, stride_kb, stride_ks, PAGE_SIZE)
            need_mask = (start < lo) | (end < start + BLOCK_N) | (start + BLOCK_N > hi_all)
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q, q_bias, Kh, Vh, K_SCALE, V_SCALE, BT, kr, offs, key_ok, row_hi,
                need_mask, stride_sb, stride_ss, HEAD_DIM, PAGE_SIZE, UPCAST, DOT_PREC, KV_FP8,
            )  # fmt: skip
            start, end, offs, key_ok, kr = n_start, n_end, n_offs, n_ok, n_kr

        # -- loop 2: vertical columns not covered by a slash run
        count = tl.load(COL_CNT + p64 * stride_np + head * stride_nh + blk)
        CB = COLS + p64 * stride_cp + head * stride_ch + blk * stride_cb
        col_ok = offs_n < count
        cols = tl.load(CB + offs_n, mask=col_ok, other=0)
        kr = _cache_rows(BT, cols, col_ok, stride_kb, stride_ks, PAGE_SIZE)
        for c in range(0, count, BLOCK_N):
            n_idx = c + BLOCK_N + offs_n
            n_ok = n_idx < count
            n_cols = tl.load(CB + n_idx, mask=n_ok, other=0)
            n_kr = _cache_rows(BT, n_cols, n_ok, stride_kb, stride_ks, PAGE_SIZE)
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q, q_bias, Kh, Vh, K_SCALE, V_SCALE, BT, kr, cols, col_ok, row_hi,
                True, stride_sb, stride_ss, HEAD_DIM, PAGE_SIZE, UPCAST, DOT_PREC, KV_FP8,
            )  # fmt: skip
            cols, col_ok, kr = n_cols, n_ok, n_kr

    # -- epilogue: out [n, Hq, D], lse [Hq, n] natural log
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    log2_sum = m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))
    lse = tl.where(has_keys, log2_sum * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head * stride_lh + rows, lse, mask=row_ok)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    index: SegmentIndex,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    if q.dim() != 4 or q.shape[0] != len(index.parts) or q.shape[1] != index.num_rows:
        raise ValueError(
            f"q must be [parts={len(index.parts)}, rows={index.num_rows}, heads, head_dim], "
            f"got {tuple(q.shape)}"
        )
    if k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride():
        raise ValueError(f"k/v must be equal paged caches, got {tuple(k.shape)}, {tuple(v.shape)}")
    hq, d = q.shape[2], q.shape[3]
    if k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"head layout mismatch: q {tuple(q.shape)}, cache {tuple(k.shape)}")
    if index.columns.shape[1] != hq:
        raise ValueError(f"index has {index.columns.shape[1]} heads, q has {hq}")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    check_kv_dtypes(q, k, v, k_scale, v_scale)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k/v must be contiguous along head_dim")
    if block_table.dim() != 1 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be a 1-d int32/int64 tensor")


def vs_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    index: SegmentIndex,
    *,
    scale: float,
    config: SparseKernelConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [P, n, Hq, D] (part p rotated for part p) over the cache through block_table, visiting
    what `index` lists -> (out [n, Hq, D], lse [Hq, n] float32). k_scale/v_scale: the float32
    scales [num_blocks, page, Hkv] of an fp8 cache, k_zero its keys' zero point [Hkv, D]."""
    _check_inputs(q, k_cache, v_cache, block_table, index, k_scale, v_scale)
    k_zero = key_zero_point(k_zero, k_scale, k_cache.shape[2], q.shape[3], q.device)
    cfg = config or sparse_config(q.shape[3])
    if (index.block_m, index.block_n) != (cfg.block_m, cfg.block_n):
        raise ValueError(
            f"index built for blocks {index.block_m}x{index.block_n}, kernel config uses "
            f"{cfg.block_m}x{cfg.block_n}"
        )
    n, hq, d = q.shape[1:]
    out = q.new_empty((n, hq, d))
    lse = torch.empty((hq, n), dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    upcast, dot_prec = dtype_flags(q.dtype)
    tiles, ranges, cols, counts = index.tile_o, index.tile_range, index.columns, index.column_count
    grid = (hq, index.num_blocks)
    s_strides = k_scale.stride() if k_scale is not None else (0, 0, 0)
    _vs_sparse_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, k_zero, block_table, out, lse,
        tiles, index.tile_e, ranges, cols, counts, index.part_info,
        index.q_pos0, n, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s_strides[0], s_strides[1], s_strides[2],
        out.stride(0), out.stride(1), lse.stride(0),
        tiles.stride(0), tiles.stride(1),
        ranges.stride(0), ranges.stride(1),
        cols.stride(0), cols.stride(1), cols.stride(2),
        counts.stride(0), counts.stride(1),
        NUM_PARTS=len(index.parts),
        GROUPS=hq // k_cache.shape[2],
        HEAD_DIM=d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=k_cache.shape[1],
        UPCAST=upcast,
        DOT_PREC=dot_prec,
        KV_FP8=k_scale is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse
