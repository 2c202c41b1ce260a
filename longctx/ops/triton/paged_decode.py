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
    2. reduce    grid (Hq, B, D / BLOCK_D): log-sum-exp merge of the cdiv(context, S)
                 non-empty partitions. Launched as a programmatic dependent launch on sm_90:
                 its programs are placed while the partial kernel drains and wait for it
                 in-kernel (griddepcontrol), which hides most of a launch gap.

P = cdiv(max_context, S) with max_context static (by default the block table's capacity,
block_table.shape[1] * page_size), so one CUDA graph serves every context length of a
batch-size bucket. S (partition_size) is picked so that a batch of the bucket's largest
contexts gives at most DecodeConfig.programs_per_sm programs per SM: all resident at once
(one wave, no tail), each streaming several tiles with num_stages - 1 loads in flight.

DCA decode (DESIGN.md section 2), cached length L, c = chunk_size - local_size, n = (L-1)//c:
intra = keys [n c, L) with the query at (L-1) mod c; successive = [(n-1) c, n c) at
min((L-1) mod c + c, C); inter = [0, (n-1) c) at min(2c-1, C). A partition runs only the
parts its key range meets (one, except at a chunk edge), in one online softmax. The same
helpers as flash_prefill.py compute the ranges and rotate the query in the kernel.

FP8 cache (k_scale / v_scale [num_blocks, page, Hkv] float32 given): fp8 tiles, half the
bytes of a bf16 cache, with the scales folded into the logits and P (flash_prefill.py's
module doc; KV_FP8 is a constexpr, the other caches compile as before).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longctx.ops.triton.flash_prefill import (
    _INTERPRET,
    LOG2E,
    DCAParams,
    _attend_tiles,
    _finish,
    _fp8_query,
    _init_state,
    _key_zero_bias,
    _load_query,
    _part_ranges,
    _yarn_row_scale,
    check_kv_dtypes,
    dtype_flags,
    key_zero_point,
    make_variant,
)

if not _INTERPRET:  # griddepcontrol is inline PTX: not in the interpreter
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:  # pragma: no cover - never traced (USE_PDL is False under the interpreter)
    gdc_launch_dependents = gdc_wait = None


@dataclass(frozen=True)
class DecodeConfig:
    """Partial-kernel tiles and launch options; programs_per_sm sizes the partitions.

    pdl: launch the reduce as a programmatic dependent launch (sm_90+, not interpreted)."""

    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2
    pdl: bool = True


# The place to tune (benchmarks/bench_attention_gpu.py --tune sweeps alternatives). Decode is
# bandwidth-bound: a 64-key tile of a 128-wide head is 16 KiB per K or V; num_stages 3 keeps
# two K/V tiles in flight per program (70 KiB of shared memory at d=128: three programs fit an
# SM). Two programs per SM: one wave, each with enough tiles to hide its start-up latency
# (H200, B=1: 32K 22.6 us against 23.9 with three per SM and 25.7 with four, which spill
# into a second wave). Rows are contiguous along head_dim, so loads are 16-byte cp.async.
DECODE_CONFIGS: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2),
    32: DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2),
    64: DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2),
    128: DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2),
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=3, programs_per_sm=2),
}
# FP8 caches (half the bytes per key): a tile takes longer to convert than to load, so more
# tiles are in flight: 3 stages in flight per program and 3 programs per SM (141 registers,
# 168 with DCA's in-kernel RoPE: 3 x 128 threads still fit; 58 KiB of shared memory each).
# H100, d=128, dense, 1M context: 468 us against 711 for the bf16 cache (1.52x); the bf16
# config (4 warps, 3 stages, 2 per SM) gives 576, 8 warps 645, 128-key tiles 713
# (benchmarks/results/fp8_kv_gpu.md times them all).
# Dense only: the DCA variant (three query rotations, more registers) runs an fp8 cache faster
# with the plain config: H200, 8 x 128K, 559 us against 743 with this one (bf16 cache: 480;
# benchmarks/results/fp8_kv_gpu_decode_sweep_h200.md).
FP8_DECODE_CONFIGS: dict[int, DecodeConfig] = {
    128: DecodeConfig(block_n=64, num_warps=4, num_stages=4, programs_per_sm=3),
}
INTERPRET_DECODE_CONFIG = DecodeConfig(block_n=32, num_warps=4, num_stages=1, pdl=False)
MIN_PARTITION = 256
MAX_PARTITION = 16384
REDUCE_BLOCK_D = 32  # head_dim slice per reduce program
REDUCE_BLOCK_P = 64  # partitions merged per loop step (fixed: no recompile per context size)


def decode_config(head_dim: int, fp8: bool = False) -> DecodeConfig:
    """Default config by head_dim, for a plain or an fp8 cache (FP8_DECODE_CONFIGS, where
    tuned for head_dim; else the plain cache's)."""
    if _INTERPRET:
        return INTERPRET_DECODE_CONFIG
    if fp8 and head_dim in FP8_DECODE_CONFIGS:
        return FP8_DECODE_CONFIGS[head_dim]
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
    max_context: int,
    batch: int,
    num_kv_heads: int,
    device: torch.device,
    block_n: int,
    programs_per_sm: int = 2,
) -> int:
    """Keys per partition: the fewest partitions per sequence that still give every SM
    programs_per_sm programs for a batch of max_context contexts, so that the grid is one
    wave without a short second one (B=8 x 128K: 8 partitions of 16K, 256 programs, rather
    than 9 with the last one short and 24 programs in a second wave). A multiple of block_n
    within [MIN_PARTITION, MAX_PARTITION]."""
    slots = _num_sms(device) * programs_per_sm
    parts = max(1, slots // (batch * num_kv_heads))
    size = -(-max_context // parts)
    size = -(-size // block_n) * block_n
    return max(MIN_PARTITION, block_n, min(MAX_PARTITION, size))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dca_part_of(key, pos, chunk_len):
    """DCA part (0 inter, 1 successive, 2 intra) of key position key for the query at pos."""
    return 2 - tl.minimum(pos // chunk_len - key // chunk_len, 2)


@triton.jit(do_not_specialize=["partition_size", "max_keys", "stride_bt", "stride_pb", "stride_lb"])
def _paged_decode_kernel(
    Q,
    K,
    V,
    K_SCALE,
    V_SCALE,
    K_ZERO,
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
    max_keys,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_sb,
    stride_ss,
    stride_sh,
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
    USE_PDL: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    if USE_PDL:  # let the reduce's programs be placed as soon as SMs free up
        gdc_launch_dependents()
    # -- program set-up: one partition of one sequence, all q heads of one kv head
    part_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    ctx = tl.load(CTX + seq).to(tl.int32)
    p_lo = part_id * partition_size
    p_hi = tl.minimum(p_lo + partition_size, ctx)
    # block-table entries are read up to a bound that does not wait for ctx to arrive
    page_hi = tl.minimum(p_lo + partition_size, max_keys)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GROUPS
    heads = (kv_head * GROUPS + offs_g).to(tl.int64)
    kv_off = kv_head.to(tl.int64) * stride_kh
    K += kv_off
    V += kv_off
    if KV_FP8:
        K_SCALE += kv_head.to(tl.int64) * stride_sh
        V_SCALE += kv_head.to(tl.int64) * stride_sh
        K_ZERO += kv_head * HEAD_DIM
    BT += seq.to(tl.int64) * stride_bt
    Qb = Q + seq.to(tl.int64) * stride_qb
    pos = ctx - 1  # the query is the newest cached token
    pos_g = pos + tl.zeros([BLOCK_G], dtype=tl.int32)
    row_scale = _yarn_row_scale(pos_g, qk_scale, yarn_inv_orig, YARN)

    # -- online softmax over the parts the partition meets (keys ascend: inter, succ, intra)
    acc, m_i, l_i = _init_state(BLOCK_G, HEAD_DIM)
    if DCA:
        part_first = _dca_part_of(p_lo, pos, chunk_len)
        part_last = tl.where(p_lo < p_hi, _dca_part_of(p_hi - 1, pos, chunk_len), -1)
    else:
        part_first = 0
        part_last = 0
    for part in range(part_first, part_last + 1):
        lo, hi, rot = _part_ranges(part, pos, p_lo, p_hi, chunk_len, chunk_size, True, DCA)
        q = _load_query(
            Qb, heads, g_ok, stride_qh, rot + 0 * pos_g, INV_FREQ, HEAD_DIM, ROPE, FAST_TRIG, UPCAST
        )
        q_bias = 0.0
        if KV_FP8:
            q_bias = _key_zero_bias(q, K_ZERO, HEAD_DIM)
            q = _fp8_query(q)
        acc, m_i, l_i, _ = _attend_tiles(
            acc,
            m_i,
            l_i,
            1.0,  # v_ref: unused (decode's P @ V is relative to each tile's largest v scale)
            q,
            row_scale,
            q_bias,
            K,
            V,
            None,
            None,
            K_SCALE,
            V_SCALE,
            BT,
            0,
            stride_kb,
            stride_ks,
            stride_sb,
            stride_ss,
            (lo // BLOCK_N) * BLOCK_N,
            hi,
            page_hi,
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
            False,
            KV_FP8,
        )

    # -- partial results: out_part [B, Hq, P, D], lse_part [B, Hq, P]
    out, lse = _finish(acc, m_i, l_i)
    offs_d = tl.arange(0, HEAD_DIM)
    base = seq.to(tl.int64) * stride_pb + heads * stride_ph + part_id * stride_pp
    tl.store(O_PART + base[:, None] + offs_d[None, :], out, mask=g_ok[:, None])
    lbase = seq.to(tl.int64) * stride_lb + heads * stride_lh + part_id
    tl.store(LSE_PART + lbase, lse, mask=g_ok)


@triton.jit(
    do_not_specialize=["partition_size", "stride_pb", "stride_lb", "stride_lh", "stride_lse_h"]
)
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
    USE_PDL: tl.constexpr,
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
    if USE_PDL:  # the partials of the partial kernel are visible past this point
        gdc_wait()

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
# Host side. paged_decode runs once per layer per decode step (28 times a token for a 7B
# model): the launch arguments of a (shapes, strides, variant, config) combination are
# computed once into a _DecodePlan, scratch buffers are reused, and nothing syncs.
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


# Scratch reused across eager calls of one shape. Calls are ordered on the stream they run
# on, so one buffer serves every layer of a step; a caller running decodes concurrently on
# several streams must pass its own workspace.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_WORKSPACES = 16


def _shared_workspace(
    batch: int, num_heads: int, head_dim: int, parts: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached scratch, except while a CUDA graph is captured: the graph then gets its own
    (from its memory pool), since a shared buffer could later be evicted and handed to other
    tensors while replays still write it."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return decode_workspace(batch, num_heads, head_dim, parts, device)
    key = (device, batch, num_heads, head_dim, parts)
    work = _WORKSPACES.get(key)
    if work is None:
        if len(_WORKSPACES) >= _MAX_WORKSPACES:
            _WORKSPACES.pop(next(iter(_WORKSPACES)))  # oldest first
        work = _WORKSPACES[key] = decode_workspace(batch, num_heads, head_dim, parts, device)
    return work


def _check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
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
    check_kv_dtypes(q, k, v, k_scale, v_scale)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous along head_dim")


@dataclass(frozen=True)
class _DecodePlan:
    """Everything of a launch that depends only on shapes, strides, variant and config."""

    partition_size: int
    parts: int
    max_keys: int
    partial_grid: tuple[int, int, int]
    reduce_grid: tuple[int, int, int]
    partial_consts: dict
    reduce_consts: dict


def _make_plan(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    max_context: int | None,
    partition_size: int | None,
    cfg: DecodeConfig,
    rope: bool,
    dca: bool,
    yarn: bool,
    fp8: bool = False,
) -> _DecodePlan:
    b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    max_keys = block_table.shape[1] * page
    max_context = max_context or max_keys
    size = partition_size or default_partition_size(
        max_context, b, hkv, q.device, cfg.block_n, cfg.programs_per_sm
    )
    if size % cfg.block_n:
        raise ValueError(f"partition_size {size} must be a multiple of block_n {cfg.block_n}")
    parts = -(-max_context // size)
    upcast, dot_prec = dtype_flags(q.dtype)
    groups = hq // hkv
    pdl = cfg.pdl and not _INTERPRET and q.is_cuda
    partial_consts = dict(
        GROUPS=groups,
        BLOCK_G=max(16, triton.next_power_of_2(groups)),
        HEAD_DIM=d,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=page,
        ROPE=rope,
        DCA=dca,
        YARN=yarn,
        UPCAST=upcast,
        DOT_PREC=dot_prec,
        FAST_TRIG=not _INTERPRET,
        USE_PDL=pdl,
        KV_FP8=fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    block_d = min(d, REDUCE_BLOCK_D)
    reduce_consts = dict(BLOCK_D=block_d, BLOCK_P=REDUCE_BLOCK_P, USE_PDL=pdl, num_warps=4)
    if pdl:
        reduce_consts["launch_pdl"] = True
    return _DecodePlan(
        size, parts, max_keys, (parts, hkv, b), (hq, b, d // block_d), partial_consts, reduce_consts
    )


_PLANS: dict[tuple, _DecodePlan] = {}


def _plan(
    q,
    k_cache,
    v_cache,
    block_table,
    context_lens,
    max_context,
    partition_size,
    cfg,
    var,
    k_scale=None,
    v_scale=None,
):
    """Cached _DecodePlan; the inputs are validated when their layout is first seen."""
    key = (
        q.shape,
        q.stride(),
        q.dtype,
        q.device,
        k_cache.shape,
        k_cache.stride(),
        v_cache.shape,
        v_cache.stride(),
        v_cache.dtype,
        None if k_scale is None else (k_scale.shape, k_scale.stride(), k_scale.dtype),
        None if v_scale is None else (v_scale.shape, v_scale.stride(), v_scale.dtype),
        block_table.shape,
        context_lens.shape,
        max_context,
        partition_size,
        cfg,
        var.rope,
        var.dca,
        var.yarn,
    )
    plan = _PLANS.get(key)
    if plan is None:
        _check_decode_inputs(q, k_cache, v_cache, block_table, context_lens, k_scale, v_scale)
        plan = _make_plan(
            q,
            k_cache,
            block_table,
            max_context,
            partition_size,
            cfg,
            var.rope,
            var.dca,
            var.yarn,
            k_scale is not None,
        )
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over the paged cache -> (out [B, Hq, D], lse [Hq, B]).

    q [B, Hq, D]; k_cache/v_cache [num_blocks, page, Hkv, D]; block_table [B, max_blocks]
    (int32/int64); context_lens [B] (cached tokens including the query's own; 0 = padding
    slot: out 0, lse -inf). rope_theta: q is unrotated, rotated in the kernel at position
    context_lens - 1 (or at its DCA positions with dca). max_context (host int, static per
    CUDA-graph bucket) bounds every context_lens[b]; default block_table.shape[1] * page.
    out/lse: optional preallocated results; workspace: optional (out_part [B, Hq, P, D],
    lse_part [B, Hq, P]) float32 buffers, P = cdiv(max_context, partition_size); by default
    a scratch shared by eager calls of the same shape on one stream. k_scale/v_scale: the
    float32 scales [num_blocks, page, Hkv] of an fp8 (float8_e4m3fn) cache, k_zero its keys'
    zero point [Hkv, D] (None: zero).
    """
    cfg = config or decode_config(q.shape[2], fp8=k_scale is not None and dca is None)
    var = make_variant(q.shape[2], q.device, rope_theta, dca, yarn_original_max)
    plan = _plan(
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        max_context,
        partition_size,
        cfg,
        var,
        k_scale,
        v_scale,
    )
    b, hq, d = q.shape
    k_zero = key_zero_point(k_zero, k_scale, k_cache.shape[2], d, q.device)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((hq, b), dtype=torch.float32, device=q.device) if lse is None else lse
    if out.shape != q.shape or lse.shape != (hq, b) or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} do not fit q")
    if b == 0:
        return out, lse
    if workspace is None:
        workspace = _shared_workspace(b, hq, d, plan.parts, q.device)
    o_part, lse_part = workspace
    if o_part.shape != (b, hq, plan.parts, d) or lse_part.shape != (b, hq, plan.parts):
        raise ValueError(
            f"workspace shapes {tuple(o_part.shape)}, {tuple(lse_part.shape)} "
            f"do not fit B={b}, Hq={hq}, P={plan.parts}, D={d}"
        )
    if o_part.stride(-1) != 1 or lse_part.stride(-1) != 1:
        raise ValueError("workspace buffers must be contiguous in their last dimension")
    _launch_decode(
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        out,
        lse,
        o_part,
        lse_part,
        scale,
        var,
        plan,
        k_scale,
        v_scale,
        k_zero,
    )
    return out, lse


def _launch_decode(
    q,
    k_cache,
    v_cache,
    block_table,
    ctx,
    out,
    lse,
    o_part,
    lse_part,
    scale,
    var,
    plan,
    k_scale=None,
    v_scale=None,
    k_zero=None,
):
    q_strides, k_strides = q.stride(), k_cache.stride()
    s_strides = k_scale.stride() if k_scale is not None else (0, 0, 0)
    p_strides, l_strides = o_part.stride(), lse_part.stride()
    _paged_decode_kernel[plan.partial_grid](
        q,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        k_zero,
        block_table,
        ctx,
        o_part,
        lse_part,
        var.inv_freq if var.rope else q,
        scale * LOG2E,
        var.yarn_inv_orig,
        var.dca_chunk_len,
        var.dca_chunk_size,
        plan.partition_size,
        plan.max_keys,
        q_strides[0],
        q_strides[1],
        k_strides[0],
        k_strides[1],
        k_strides[2],
        s_strides[0],
        s_strides[1],
        s_strides[2],
        block_table.stride(0),
        p_strides[0],
        p_strides[1],
        p_strides[2],
        l_strides[0],
        l_strides[1],
        **plan.partial_consts,
    )
    out_strides = out.stride()
    _decode_reduce_kernel[plan.reduce_grid](
        o_part,
        lse_part,
        ctx,
        out,
        lse,
        plan.partition_size,
        p_strides[0],
        p_strides[1],
        p_strides[2],
        l_strides[0],
        l_strides[1],
        out_strides[0],
        out_strides[1],
        lse.stride(0),
        **plan.reduce_consts,
    )
