"""Flash-attention forward over the paged KV cache (Triton), with in-kernel RoPE, DCA and YaRN.

One kernel serves every prefill flavour; constexpr flags pick the variant:

    dense causal    query at absolute position p sees keys [k_start, min(p + 1, k_end))
    dense range     every query sees keys [k_start, k_end)              (causal=False)
    DCA             three key parts per query, each with its own query rotation (below)

Queries are token-major q [T, Hq, D]: one sequence, or a varlen batch whose sequence s owns
rows cu_seqlens_q[s] : cu_seqlens_q[s + 1]; row i of sequence s sits at absolute position
q_pos0[s] + i. Keys and values are read in place from the paged cache through the block
table (no copy of the prefix); the contiguous entry point (block_table=None) reads fresh
k/v [Lk, Hkv, D] directly, for a first prefill chunk whose keys are not cached yet.

Program layout: grid (query blocks, Hq, sequences); a program owns BLOCK_M queries of one
q head and reads its kv head (GQA without repeating K/V: the q heads of a group run as
neighbouring programs and share K/V through L2). Query blocks run latest-first: under a
causal mask they carry the most keys, so the long programs start early.

Per part, each query row has a key interval [row_lo, row_hi). Tiles of BLOCK_N keys, aligned
to multiples of BLOCK_N in absolute key position, fall into three runs:

    key:  first        full_lo                 full_hi        hi_max
          |--masked----|-------unmasked---------|----masked----|
           rows' lo vary  all rows see all keys  rows' hi vary (the causal diagonal)

so masking costs only on the band edges (the causal diagonal, DCA chunk edges). With
KernelConfig.tma the unmasked run reads K/V tiles through tensor descriptors (the copy
engine: no per-thread address arithmetic, fewer registers) over the cache viewed as rows
[num_blocks * page, Hkv * D]: a tile is the BLOCK_N rows from page * PAGE_SIZE (needs
PAGE_SIZE % BLOCK_N == 0). Masked tiles keep masked pointer loads: keys past the valid range
may be garbage (NaN) that p @ v must never see.

The softmax scale (times log2 e, for exp2) is applied to the logits, fused with the max
subtraction into one FMA, so that an unrotated query is a plain load: the query tile then
stays in shared memory as the wgmma A operand instead of being reloaded into registers
every tile. A rotated query (RoPE, DCA) gets there by a round trip through the program's
own output rows (_restage_query).

DCA (DESIGN.md section 2): c = chunk_size - local_size. A key at position j is cached rotated
at j mod c. A query at p (chunk n = p // c) attends to

    keys    [0, (n-1)c)         [(n-1)c, nc)              [nc, p]
    part    inter               successive                intra (causal)
    q pos   min(2c-1, C)        min(p mod c + c, C)       p mod c

The three parts share one online softmax: merging their (out, lse) by log-sum-exp is exactly
a softmax over the union of the keys, so no merge pass and no 3x query tensor are needed. A
part none of the block's rows sees is skipped whole (no rotation, no loop set-up).

YaRN: with original_max set, logits of the query at p are multiplied by f(p)^2,
f(p) = max(1, 0.1 ln((p + 1) / original_max) + 1).

FP8 cache (k_scale / v_scale given; KV_FP8, a constexpr, so other caches compile as before):
k/v hold float8_e4m3fn, with float32 scales [num_blocks, page, Hkv] (contiguous keys:
[Lk, Hkv]) per (token, kv head), value = stored * scale, and keys relative to a zero point
k_zero [Hkv, D] per layer: key = stored * scale + k_zero (longctx/layers/attention/
kv_quant.py). A tile is loaded as fp8 (half the bytes), converted to the dot dtype (q's;
float32 under the interpreter), and the scales are folded in where they cost a row or a
column rather than a whole tile: each key column's logits are multiplied by its k scale and
the zero point enters as one number per query row and part, q . k_zero
(s = ((q . k_stored) * k_scale[n] + q . k_zero) * softmax scale), and P by the v scale of
its column before P @ V (the row sum l keeps the unscaled P). The dots run in fp16 with
bf16 queries (e4m3 -> fp16 is one instruction per pair, -> bf16 one more per value; fp16
holds e4m3 exactly and keeps 3 more mantissa bits of q and P); to keep p * v_scale in
fp16's range, P is scaled relative to the tile's largest v scale and the tile's P @ V
scaled back in float32.
Unmasked runs then use pointer loads (no tensor descriptors over fp8). The interpreter of
triton 3.7 loads float8e4nv pointers directly (only the NaN code 0x7f reads as 480 there;
the quantizer never writes it).

Outputs: out [T, Hq, D] in q's dtype, lse [Hq, T] float32 natural log; a query with no keys
gets out = 0, lse = -inf (the conventions of longctx/ops/attention.py).

On sm_90 (H100/H200), flash_prefill_varlen hands what the Hopper kernel covers (16-bit, no
fp8 cache, head_dim 64/128, pages of 16-64 keys or multiples of 128; config left to default)
to the warp-specialized Gluon kernel of flash_prefill_ws.py, after rotating the queries into
out's rows with _rotate_queries_kernel (DCA: three rotated copies, its parts as key ranges,
an LSE merge).
This kernel is the reference it is checked against and the fallback for everything else.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import triton
import triton.language as tl

from longctx.ops.triton import flash_prefill_ws as ws

try:  # host-side tensor descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634
FP8_DTYPE = torch.float8_e4m3fn  # the fp8 KV-cache format (scales float32 per token and head)
_NO_KEY_LIMIT = tl.constexpr(2**30)  # "no bound" for key positions (int32)
# Read once: TRITON_INTERPRET must be set before any kernel is defined anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class DCAParams(Protocol):
    """What the kernels need of a DCA configuration (longctx.config.DCAConfig fits)."""

    chunk_size: int
    local_size: int


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel.

    tma: read the unmasked K/V tiles through tensor descriptors when the layout allows it
    (cache pages a multiple of block_n, rows contiguous); otherwise pointer loads.
    (Triton 3.6 ignores tl.range(warp_specialize=True) on sm_90 for this loop: the sm_90
    binary came out identical, so no warp-specialization option here.)
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


# The place to tune (benchmarks/bench_attention_gpu.py --tune sweeps alternatives). Fixed
# configs, no autotune: the interpreter cannot autotune, and a fixed config keeps compiled
# kernels deterministic. Chosen for sm_90 by head_dim (benchmarks/results/
# attention_tuning_notes.md): BLOCK_M 128 with 8 warps = two warpgroups of 64 rows on wgmma,
# K/V of the unmasked run through tensor descriptors. BLOCK_N 64 with 3 stages = 3 x (K + V)
# tiles of 16 KiB + the 32 KiB query tile = 128 KiB of shared memory. When cache pages hold
# whole 128-key tiles (block size 128, 256, ...; or contiguous keys), 128-key tiles with 3
# stages: 224 KiB, one CTA per SM, 28% fewer instructions per key (H200, 32K causal: 492
# against 464 TFLOP/s). tests/ops/test_triton_compile.py checks the fit for sm_90.
# Head dims 16, 32 and 256 (small test models, a few other architectures) get modest,
# untuned tiles that fit shared memory.
PREFILL_CONFIGS: dict[int, KernelConfig] = {
    16: KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    32: KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    64: KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, tma=True),
    128: KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, tma=True),
    256: KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
}
LARGE_PAGE_PREFILL_CONFIGS: dict[int, KernelConfig] = {
    128: KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True),
}
FLOAT32_PREFILL_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
# Under the interpreter the cost is programs x loop iterations: larger tiles run faster.
INTERPRET_PREFILL_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)


def interpreting() -> bool:
    return _INTERPRET


def prefill_config(head_dim: int, page_size: int | None = None, itemsize: int = 2) -> KernelConfig:
    """Default tiles for head_dim; page_size (None: contiguous keys) picks 128-key tiles
    where a page holds whole tiles. float32 inputs (itemsize 4: correctness checks on the GPU,
    never the fast path) get small tiles, as theirs take twice the shared memory."""
    if _INTERPRET:
        return INTERPRET_PREFILL_CONFIG
    if itemsize > 2 and head_dim <= 128:
        return FLOAT32_PREFILL_CONFIG
    if head_dim not in PREFILL_CONFIGS:
        raise ValueError(
            f"no prefill config for head_dim {head_dim} (have {sorted(PREFILL_CONFIGS)})"
        )
    large = LARGE_PAGE_PREFILL_CONFIGS.get(head_dim)
    if large is not None and (page_size is None or page_size % large.block_n == 0):
        return large
    return PREFILL_CONFIGS[head_dim]


# ----------------------------------------------------------------------------------------------
# Shared Triton building blocks (also used by paged_decode.py)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rope_cos_sin(pos, INV_FREQ, HALF: tl.constexpr, FAST_TRIG: tl.constexpr):
    """cos, sin [ROWS, HALF] of RoPE frequency i at integer positions pos [ROWS].

    The angle is the float32 product pos * inv_freq, as in layers/rotary.py. It is reduced to
    [-pi, pi] in float64 (positions reach 10^6 radians), where the GPU's approximate
    sin/cos (FAST_TRIG) are accurate to ~1e-6; the interpreter uses numpy's.
    """
    inv_freq = tl.load(INV_FREQ + tl.arange(0, HALF))
    angle = (pos.to(tl.float32)[:, None] * inv_freq[None, :]).to(tl.float64)
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)  # 1 / (2 pi)
    angle = (angle - turns * 6.283185307179586).to(tl.float32)
    if FAST_TRIG:
        cos = tl.inline_asm_elementwise(
            "cos.approx.f32 $0, $1;", "=r,r", [angle], dtype=tl.float32, is_pure=True, pack=1
        )
        sin = tl.inline_asm_elementwise(
            "sin.approx.f32 $0, $1;", "=r,r", [angle], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    return cos, sin


@triton.jit
def _yarn_row_scale(pos, qk_scale, yarn_inv_orig, YARN: tl.constexpr):
    """Logit multiplier per query row: softmax scale * log2(e) * f(p)^2 (f = 1 without YaRN)."""
    scale = qk_scale + tl.zeros(pos.shape, tl.float32)
    if YARN:
        f = 0.1 * tl.log((pos + 1).to(tl.float32) * yarn_inv_orig) + 1.0
        f = tl.maximum(f, 1.0)
        scale = scale * f * f
    return scale


@triton.jit
def _load_query(
    Q,
    rows,
    row_ok,
    stride_row,
    rot_pos,
    INV_FREQ,
    HEAD_DIM: tl.constexpr,
    ROPE: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Query tile [ROWS, HEAD_DIM] in the dot dtype, rotated at rot_pos (if ROPE), unscaled.

    Without ROPE it is a plain load, which lets Triton keep it in shared memory as the A
    operand of every tile's q @ k^T."""
    base = Q + rows[:, None] * stride_row
    if ROPE:
        # rotate-half on the two halves, then put them back side by side
        HALF: tl.constexpr = HEAD_DIM // 2
        offs_h = tl.arange(0, HALF)[None, :]
        q1 = tl.load(base + offs_h, mask=row_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(base + HALF + offs_h, mask=row_ok[:, None], other=0.0).to(tl.float32)
        cos, sin = _rope_cos_sin(rot_pos, INV_FREQ, HALF, FAST_TRIG)
        r1 = q1 * cos - q2 * sin
        r2 = q2 * cos + q1 * sin
        q = tl.reshape(tl.permute(tl.join(r1, r2), (0, 2, 1)), (r1.shape[0], HEAD_DIM))
        if not UPCAST:
            q = q.to(Q.dtype.element_ty)
    else:
        offs_d = tl.arange(0, HEAD_DIM)[None, :]
        q = tl.load(base + offs_d, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
    return q


@triton.jit
def _restage_query(q, O_PTRS, row_ok):
    """Round-trip a computed (rotated) query tile through this program's own output rows,
    which are written only in the epilogue. A loaded tile is what Triton keeps in shared
    memory as the A operand of every q @ k^T (SS-wgmma); a computed one it holds in
    registers and reloads from shared memory each key tile (8 LDSM.x4 per tile at d=128)."""
    tl.debug_barrier()  # the previous part's reads of these rows are done
    tl.store(O_PTRS, q, mask=row_ok[:, None])
    tl.debug_barrier()
    return tl.load(O_PTRS, mask=row_ok[:, None], other=0.0)


@triton.jit
def _part_ranges(
    part, pos, k_start, k_end, chunk_len, chunk_size, CAUSAL: tl.constexpr, DCA: tl.constexpr
):
    """Key interval [lo, hi) and query rotation position of each query for one part.

    Dense: a single part. DCA: part 0 inter, 1 successive, 2 intra (see the module doc).
    Works on vectors of positions (prefill) and on scalars (decode).
    """
    if DCA:
        start = (pos // chunk_len) * chunk_len  # first key of the query's chunk
        prev = tl.maximum(start - chunk_len, 0)  # first key of the previous chunk
        in_chunk = pos - start
        lo = tl.where(part == 2, start, tl.where(part == 1, prev, 0))
        hi = tl.where(part == 2, pos + 1, tl.where(part == 1, start, prev))
        succ_pos = tl.minimum(in_chunk + chunk_len, chunk_size)
        inter_pos = tl.minimum(2 * chunk_len - 1, chunk_size) + 0 * pos
        rot = tl.where(part == 2, in_chunk, tl.where(part == 1, succ_pos, inter_pos))
    else:
        lo = k_start + 0 * pos
        if CAUSAL:
            hi = pos + 1
        else:
            hi = k_end + 0 * pos
        rot = pos
    lo = tl.maximum(lo, k_start)
    hi = tl.minimum(hi, k_end)
    return lo, hi, rot


@triton.jit
def _tile_pages(
    BT,
    start_n,
    page_hi,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Cache block(s) of the key tile starting at start_n: token t lives in block
    BT[t // PAGE_SIZE], row t % PAGE_SIZE. A scalar when a tile never spans two blocks
    (PAGE_SIZE a multiple of BLOCK_N; tiles are BLOCK_N-aligned), else one entry per key.
    Entries at or past key page_hi (within the table) are not read."""
    if PAGED:
        if PAGE_SIZE % BLOCK_N == 0:
            page = tl.load(BT + start_n // PAGE_SIZE, mask=start_n < page_hi, other=0)
        else:
            offs = start_n + tl.arange(0, BLOCK_N)
            page = tl.load(BT + offs // PAGE_SIZE, mask=offs < page_hi, other=0)
        page = page.to(tl.int64)
    else:
        page = tl.zeros([], dtype=tl.int64)
    return page


@triton.jit
def _kv_row_offsets(page, offs, stride_kb, stride_ks, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Element offsets [BLOCK_N] of the cache rows holding key positions offs."""
    if PAGED:
        rows = page * stride_kb + (offs % PAGE_SIZE).to(tl.int64) * stride_ks
    else:
        rows = offs.to(tl.int64) * stride_ks
    return rows


@triton.jit
def _tile_row(page, start_n, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """First row of a key tile in the 2-d cache view [num_blocks * PAGE_SIZE, Hkv * D]."""
    if PAGED:
        row = page.to(tl.int32) * PAGE_SIZE + start_n % PAGE_SIZE
    else:
        row = start_n
    return row


@triton.jit
def _attend_tiles(
    acc,
    m_i,
    l_i,
    v_ref,
    q,
    row_scale,
    q_bias,
    K,
    V,
    K_DESC,
    V_DESC,
    K_SCALE,
    V_SCALE,
    BT,
    kv_col,
    stride_kb,
    stride_ks,
    stride_sb,
    stride_ss,
    tile_lo,
    tile_hi,
    page_hi,
    key_lo,
    key_hi,
    row_lo,
    row_hi,
    MASKED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TMA: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_RUNNING_REF: tl.constexpr = False,
):
    """Online softmax over key tiles [tile_lo, tile_hi) (BLOCK_N-aligned).

    Logits are qk * row_scale in log2 units (one FMA with the max subtraction); m_i is the
    running max in those units. MASKED: keys outside [key_lo, key_hi) are not loaded (zeros,
    so NaN garbage in unused cache rows cannot leak through p @ v) and each row keeps only
    [row_lo, row_hi). Block-table entries are read below key page_hi (decode passes a bound
    known before the context length arrives). TMA (unmasked runs only): K/V tiles through
    the descriptors. KV_FP8: fp8 tiles with per-key scales K_SCALE / V_SCALE (strides
    stride_sb, stride_ss per block and row), folded into the logits and P (module doc):
    P @ V in fp16 with P relative to the tile's largest v scale (_fp8_pv), or with
    FP8_RUNNING_REF relative to v_ref, the largest v scale seen so far (acc is then in units
    of v_ref: rescaled with alpha when it grows, and times v_ref at the end by the caller),
    which accumulates in place -- no second accumulator (prefill's 128 x 128 tiles would
    spill it).
    The block-table entry of the next tile is read one iteration ahead and carried: a
    K/V address that depends on a load of the same iteration stops Triton's pipeliner
    from keeping more than one tile in flight (measured in the sm_90 TTGIR: 2 buffers
    and a full wait per tile, against num_stages buffers with the carried entry).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    page = _tile_pages(BT, tile_lo, page_hi, PAGED, PAGE_SIZE, BLOCK_N)
    for start_n in range(tile_lo, tile_hi, BLOCK_N):
        offs = start_n + offs_n
        if MASKED:
            key_ok = (offs >= key_lo) & (offs < key_hi)
        if KV_FP8:  # per-key scales; masked keys get 0 (their logits become -inf below)
            s_rows = _kv_row_offsets(page, offs, stride_sb, stride_ss, PAGED, PAGE_SIZE)
            if MASKED:
                k_sc = tl.load(K_SCALE + s_rows, mask=key_ok, other=0.0)
                v_sc = tl.load(V_SCALE + s_rows, mask=key_ok, other=0.0)
            else:
                k_sc = tl.load(K_SCALE + s_rows)
                v_sc = tl.load(V_SCALE + s_rows)
        if TMA:
            row = _tile_row(page, start_n, PAGED, PAGE_SIZE)
            page = _tile_pages(BT, start_n + BLOCK_N, page_hi, PAGED, PAGE_SIZE, BLOCK_N)
            k = K_DESC.load([row, kv_col])
        else:
            rows = _kv_row_offsets(page, offs, stride_kb, stride_ks, PAGED, PAGE_SIZE)
            page = _tile_pages(BT, start_n + BLOCK_N, page_hi, PAGED, PAGE_SIZE, BLOCK_N)
            ptrs = rows[:, None] + offs_d[None, :]
            if MASKED:
                k = tl.load(K + ptrs, mask=key_ok[:, None], other=0.0)
            else:
                k = tl.load(K + ptrs)
        if KV_FP8:
            k = k.to(q.dtype)
        elif UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if KV_FP8:  # dequantized k = stored * k_sc + zero: q . zero is the row's q_bias
            qk = qk * k_sc[None, :] + q_bias[:, None]
        if MASKED:
            seen = (offs[None, :] >= row_lo[:, None]) & (offs[None, :] < row_hi[:, None])
            qk = tl.where(seen, qk, float("-inf"))
        # row_scale > 0, so the max of the scaled row is the scaled max
        m_new = tl.maximum(m_i, tl.max(qk, 1) * row_scale)
        p = tl.math.exp2(qk * row_scale[:, None] - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            if FP8_RUNNING_REF:  # acc is in units of v_ref
                new_ref = tl.maximum(v_ref, tl.max(v_sc, 0))
                alpha = alpha * (v_ref / new_ref)
                v_ref = new_ref
        acc = acc * alpha[:, None]
        if TMA:
            v = V_DESC.load([row, kv_col])
        elif MASKED:
            v = tl.load(V + ptrs, mask=key_ok[:, None], other=0.0)
        else:
            v = tl.load(V + ptrs)
        if KV_FP8:
            if FP8_RUNNING_REF:
                p_v = (p * (v_sc * (1.0 / v_ref))[None, :]).to(q.dtype)
                acc = tl.dot(p_v, v.to(q.dtype), acc, input_precision=DOT_PREC)
            else:
                acc = _fp8_pv(acc, p, v, v_sc, q.dtype, DOT_PREC)
        else:
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i, v_ref


@triton.jit
def _key_zero_bias(q, K_ZERO, HEAD_DIM: tl.constexpr):
    """q . zero per query row [ROWS] (float32): an fp8 cache's keys are stored relative to a
    per-(layer, kv head) zero point, which adds this constant to every logit of the row."""
    z = tl.load(K_ZERO + tl.arange(0, HEAD_DIM))
    return tl.sum(q.to(tl.float32) * z[None, :], 1)


@triton.jit
def _fp8_query(q):
    """The dot dtype over an fp8 cache: a bf16 query goes to fp16 (e4m3 -> fp16 is one
    instruction per pair of values, -> bf16 one more per value; fp16 also keeps 3 more
    mantissa bits), clamped to fp16's range; fp16 and float32 queries stay."""
    if q.dtype == tl.bfloat16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _fp8_pv(acc, p, v, v_sc, dot_dtype: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + (p * v_scale) @ v over an fp8 value tile. P is scaled per key column, relative to
    the tile's largest scale (so p * scale never underflows fp16), and the tile's product is
    scaled back in float32; the row sum l stays with the unscaled p."""
    v_top = tl.maximum(tl.max(v_sc, 0), 1.0e-30)  # masked keys have scale 0
    p_v = p * (v_sc * (1.0 / v_top))[None, :]
    pv = tl.dot(p_v.to(dot_dtype), v.to(dot_dtype), input_precision=DOT_PREC)
    return acc + pv * v_top


@triton.jit
def _init_state(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    # A finite floor instead of -inf: a row whose keys are all masked so far keeps
    # exp2(m_old - m_new) = 1 and p = 0 instead of NaN.
    m_i = tl.zeros([ROWS], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    return acc, m_i, l_i


@triton.jit
def _finish(acc, m_i, l_i):
    """Normalized output and natural-log LSE; rows without keys give 0 and -inf."""
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    log2_sum = m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))
    lse = tl.where(has_keys, log2_sum * 0.6931471805599453, float("-inf"))
    return out, lse


# ----------------------------------------------------------------------------------------------
# Prefill kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attend_band(
    acc,
    m_i,
    l_i,
    v_ref,
    q,
    row_scale,
    q_bias,
    K,
    V,
    K_DESC,
    V_DESC,
    K_SCALE,
    V_SCALE,
    BT,
    kv_col,
    stride_kb,
    stride_ks,
    stride_sb,
    stride_ss,
    row_lo,
    row_hi,
    row_ok,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TMA: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """All keys of a query block for one part: masked edges, unmasked middle (module doc)."""
    lo_min = tl.min(tl.where(row_ok, row_lo, _NO_KEY_LIMIT), 0)
    lo_max = tl.max(tl.where(row_ok, row_lo, 0), 0)
    hi_min = tl.min(tl.where(row_ok, row_hi, _NO_KEY_LIMIT), 0)
    hi_max = tl.max(tl.where(row_ok, row_hi, 0), 0)
    first = (lo_min // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(lo_max, BLOCK_N) * BLOCK_N
    full_hi = (hi_min // BLOCK_N) * BLOCK_N
    # No unmasked run: let the first masked run cover everything.
    no_full = full_lo >= full_hi
    full_lo = tl.where(no_full, tl.cdiv(hi_max, BLOCK_N) * BLOCK_N, full_lo)
    full_hi = tl.where(no_full, full_lo, full_hi)
    # masked leading edge, unmasked middle, masked trailing edge (the causal diagonal)
    for run in tl.static_range(3):
        if run == 0:
            tile_lo, tile_hi = first, full_lo
        elif run == 1:
            tile_lo, tile_hi = full_lo, full_hi
        else:
            tile_lo, tile_hi = full_hi, hi_max
        acc, m_i, l_i, v_ref = _attend_tiles(
            acc,
            m_i,
            l_i,
            v_ref,
            q,
            row_scale,
            q_bias,
            K,
            V,
            K_DESC,
            V_DESC,
            K_SCALE,
            V_SCALE,
            BT,
            kv_col,
            stride_kb,
            stride_ks,
            stride_sb,
            stride_ss,
            tile_lo,
            tile_hi,
            hi_max,
            lo_min,
            hi_max,
            row_lo,
            row_hi,
            run != 1,
            PAGED,
            PAGE_SIZE,
            BLOCK_N,
            HEAD_DIM,
            UPCAST,
            DOT_PREC,
            TMA & (run == 1),
            KV_FP8,
            True,  # FP8_RUNNING_REF: in-place P @ V (module doc)
        )
    return acc, m_i, l_i, v_ref


@triton.jit(do_not_specialize=["stride_lh", "stride_bt"])
def _flash_prefill_kernel(
    Q,
    K,
    V,
    K_DESC,
    V_DESC,
    K_SCALE,
    V_SCALE,
    K_ZERO,
    BT,
    Out,
    LSE,
    CU_Q,
    Q_POS0,
    K_START,
    K_END,
    INV_FREQ,
    qk_scale,
    yarn_inv_orig,
    chunk_len,
    chunk_size,
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
    stride_bt,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROPE: tl.constexpr,
    DCA: tl.constexpr,
    YARN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr,
    TMA: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # -- program set-up: which queries, which heads, which sequence
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_begin = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_begin
    if start_m >= q_len:
        return
    q_pos0 = tl.load(Q_POS0 + seq)
    k_start = tl.load(K_START + seq)
    k_end = tl.load(K_END + seq)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    pos = q_pos0 + offs_m  # absolute query positions
    rows = (q_begin + offs_m).to(tl.int64)
    kv_head = head // GROUPS
    kv_off = kv_head.to(tl.int64) * stride_kh
    K += kv_off
    V += kv_off
    if KV_FP8:
        K_SCALE += kv_head.to(tl.int64) * stride_sh
        V_SCALE += kv_head.to(tl.int64) * stride_sh
        K_ZERO += kv_head * HEAD_DIM
    BT += seq.to(tl.int64) * stride_bt
    Qh = Q + head.to(tl.int64) * stride_qh
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = Out + rows[:, None] * stride_ot + head.to(tl.int64) * stride_oh + offs_d[None, :]
    row_scale = _yarn_row_scale(pos, qk_scale, yarn_inv_orig, YARN)

    # -- online softmax over every part's keys
    acc, m_i, l_i = _init_state(BLOCK_M, HEAD_DIM)
    v_ref = tl.full([], 1.0e-30, tl.float32)  # fp8: the largest v scale seen (acc's unit)
    NUM_PARTS: tl.constexpr = 3 if DCA else 1
    for part in range(NUM_PARTS):
        row_lo, row_hi, rot_pos = _part_ranges(
            part, pos, k_start, k_end, chunk_len, chunk_size, CAUSAL, DCA
        )
        if tl.max(tl.where(row_ok & (row_lo < row_hi), 1, 0), 0) > 0:
            q = _load_query(
                Qh, rows, row_ok, stride_qt, rot_pos, INV_FREQ, HEAD_DIM, ROPE, FAST_TRIG, UPCAST
            )
            if ROPE and not UPCAST:
                q = _restage_query(q, o_ptrs, row_ok)
            q_bias = 0.0
            if KV_FP8:
                q_bias = _key_zero_bias(q, K_ZERO, HEAD_DIM)
                q = _fp8_query(q)
            acc, m_i, l_i, v_ref = _attend_band(
                acc,
                m_i,
                l_i,
                v_ref,
                q,
                row_scale,
                q_bias,
                K,
                V,
                K_DESC,
                V_DESC,
                K_SCALE,
                V_SCALE,
                BT,
                kv_head * HEAD_DIM,
                stride_kb,
                stride_ks,
                stride_sb,
                stride_ss,
                row_lo,
                row_hi,
                row_ok,
                PAGED,
                PAGE_SIZE,
                BLOCK_N,
                HEAD_DIM,
                UPCAST,
                DOT_PREC,
                TMA,
                KV_FP8,
            )

    # -- epilogue: out [T, Hq, D], lse [Hq, T]
    if KV_FP8:
        acc = acc * v_ref
    out, lse = _finish(acc, m_i, l_i)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head.to(tl.int64) * stride_lh + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["stride_qt", "stride_ot", "stride_op"])
def _rotate_queries_kernel(
    Q,
    Out,
    CU_Q,
    Q_POS0,
    INV_FREQ,
    chunk_len,
    chunk_size,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_op,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DCA: tl.constexpr,
    FAST_TRIG: tl.constexpr,
):
    """The pre-pass of the Hopper kernel, which takes rotated queries: out[row] = RoPE(q[row])
    at its absolute position p. With DCA, the three query variants: out[part, row] rotated at
    the part's position (inter, successive, intra: _part_ranges), part stride stride_op."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_begin = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_begin
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    pos = tl.load(Q_POS0 + seq) + offs_m
    rows = (q_begin + offs_m).to(tl.int64)
    Qh = Q + head.to(tl.int64) * stride_qh
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = Out + rows[:, None] * stride_ot + head.to(tl.int64) * stride_oh + offs_d[None, :]
    NUM_PARTS: tl.constexpr = 3 if DCA else 1
    for part in tl.static_range(NUM_PARTS):
        rot = _part_ranges(part, pos, 0, _NO_KEY_LIMIT, chunk_len, chunk_size, True, DCA)[2]
        q = _load_query(Qh, rows, row_ok, stride_qt, rot, INV_FREQ, HEAD_DIM, True, FAST_TRIG, True)
        tl.store(o_ptrs + part * stride_op, q.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["n_rows", "stride_lh", "stride_ot", "stride_mh"])
def _merge_parts_kernel(
    Parts,
    PartLSE,
    Out,
    LSE,
    n_rows,
    stride_lh,
    stride_ot,
    stride_oh,
    stride_mh,
    NUM_PARTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Merge attentions over disjoint key sets by log-sum-exp (longctx.ops.attention.
    merge_attention): parts [P, T, Hq, D] contiguous, part_lse [Hq, P * T] -> out, lse."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    row_ok = offs_m < n_rows
    rows = offs_m.to(tl.int64)
    hq = tl.num_programs(1)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for part in tl.static_range(NUM_PARTS):
        lse_p = tl.load(PartLSE + head * stride_lh + part * n_rows + rows, mask=row_ok)
        m = tl.maximum(m, lse_p)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_d = tl.arange(0, HEAD_DIM)
    for part in tl.static_range(NUM_PARTS):
        lse_p = tl.load(PartLSE + head * stride_lh + part * n_rows + rows, mask=row_ok)
        w = tl.exp(lse_p - m_safe)  # exp(-inf) = 0 for a part without keys
        src = Parts + ((part * n_rows + rows) * hq + head)[:, None] * HEAD_DIM + offs_d[None, :]
        acc += w[:, None] * tl.load(src, mask=row_ok[:, None], other=0.0).to(tl.float32)
        total += w
    has_keys = total > 0.0
    out = acc / tl.where(has_keys, total, 1.0)[:, None]
    o_ptrs = Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_keys, m_safe + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    tl.store(LSE + head * stride_mh + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Host side. Wrappers run once per layer per step: everything that does not change between
# calls (inv_freq, variants, descriptors, small index tensors) is cached, and nothing syncs.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """inv_freq [head_dim / 2] float32, the same formula (and bits) as layers/rotary.py."""
    exponents = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


@dataclass(frozen=True)
class _Variant:
    """Position-dependent options shared by the prefill and decode wrappers."""

    inv_freq: torch.Tensor | None
    dca_chunk_len: int
    dca_chunk_size: int
    yarn_inv_orig: float

    @property
    def rope(self) -> bool:
        return self.inv_freq is not None

    @property
    def dca(self) -> bool:
        return self.dca_chunk_len > 0

    @property
    def yarn(self) -> bool:
        return self.yarn_inv_orig > 0.0


def make_variant(
    head_dim: int,
    device: torch.device,
    rope_theta: float | None,
    dca: DCAParams | None,
    yarn_original_max: int | None,
) -> _Variant:
    dca_key = None if dca is None else (int(dca.chunk_size), int(dca.local_size))
    theta = None if rope_theta is None else float(rope_theta)
    return _make_variant(head_dim, device, theta, dca_key, yarn_original_max or 0)


@functools.lru_cache(maxsize=64)
def _make_variant(
    head_dim: int,
    device: torch.device,
    rope_theta: float | None,
    dca: tuple[int, int] | None,
    yarn_original_max: int,
) -> _Variant:
    if dca is not None and rope_theta is None:
        raise ValueError("DCA rotates queries in the kernel: pass rope_theta")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    inv_freq = None if rope_theta is None else rope_inv_freq(head_dim, rope_theta, device)
    chunk_len = chunk_size = 0
    if dca is not None:
        chunk_size, chunk_len = dca[0], dca[0] - dca[1]
        if chunk_len <= 0:
            raise ValueError(f"DCA needs chunk_size > local_size, got {dca}")
    yarn_inv = 1.0 / yarn_original_max if yarn_original_max else 0.0
    return _Variant(inv_freq, chunk_len, chunk_size, yarn_inv)


_DTYPE_FLAGS = {
    torch.float16: (False, "tf32"),
    torch.bfloat16: (_INTERPRET, "tf32"),
    torch.float32: (False, "ieee"),
}


def dtype_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC): bf16 is broken in the interpreter, so upcast loads there; fp32 dots
    use full IEEE precision rather than TF32."""
    if dtype not in _DTYPE_FLAGS:
        raise ValueError(f"unsupported dtype {dtype}")
    return _DTYPE_FLAGS[dtype]


@functools.lru_cache(maxsize=256)
def _int64_args(device: torch.device, values: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device)


@functools.lru_cache(maxsize=256)
def _int32_args(device: torch.device, values: tuple[int, ...]) -> torch.Tensor:
    """Small int32 index tensor on device, built once per distinct value tuple (an
    uncached host list -> device copy would cost a blocking transfer every call)."""
    return torch.tensor(values, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=16)
def _zeros(hkv: int, d: int, device: torch.device) -> torch.Tensor:
    return torch.zeros((hkv, d), dtype=torch.float32, device=device)


def key_zero_point(
    k_zero: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    hkv: int,
    d: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The zero point an fp8 cache's keys are stored relative to, [Hkv, D] float32
    contiguous (None given: zeros); None for a plain cache."""
    if k_scale is None:
        if k_zero is not None:
            raise ValueError("k_zero belongs to an fp8 cache: pass k_scale/v_scale with it")
        return None
    if k_zero is None:
        return _zeros(hkv, d, device)
    if k_zero.shape != (hkv, d) or k_zero.dtype != torch.float32 or not k_zero.is_contiguous():
        raise ValueError(
            f"k_zero must be a contiguous float32 [{hkv}, {d}] tensor, got "
            f"{tuple(k_zero.shape)} {k_zero.dtype}"
        )
    return k_zero


def check_kv_dtypes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """A plain cache has q's dtype; an fp8 cache comes with float32 scales [*k.shape[:-1]]."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale (an fp8 cache) or neither")
    if k_scale is None:
        if q.dtype != k.dtype or k.dtype != v.dtype:
            raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        return
    if k.dtype != FP8_DTYPE or v.dtype != FP8_DTYPE:
        raise ValueError(f"k_scale/v_scale need float8_e4m3fn k/v, got {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPE_FLAGS:
        raise ValueError(f"unsupported query dtype {q.dtype}")
    if k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32:
        raise ValueError(f"k_scale/v_scale must be float32, got {k_scale.dtype}, {v_scale.dtype}")
    if k_scale.shape != k.shape[:-1] or v_scale.shape != k_scale.shape:
        raise ValueError(
            f"k_scale/v_scale must be {tuple(k.shape[:-1])} (one per token and kv head), got "
            f"{tuple(k_scale.shape)}, {tuple(v_scale.shape)}"
        )
    if k_scale.stride() != v_scale.stride():
        raise ValueError("k_scale and v_scale must have equal strides")


def _check_prefill_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor | None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    want = 4 if block_table is not None else 3
    if k.dim() != want or k.shape != v.shape or k.stride() != v.stride():
        raise ValueError(
            f"k/v must be equal {want}-d tensors with equal strides: "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[-2]
    if k.shape[-1] != d or hq % hkv:
        raise ValueError(f"head layout mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    check_kv_dtypes(q, k, v, k_scale, v_scale)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k/v must be contiguous along head_dim")


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    block_table: torch.Tensor | None = None,
    q_pos0: int = 0,
    k_start: int = 0,
    k_end: int | None = None,
    causal: bool = True,
    rope_theta: float | None = None,
    dca: DCAParams | None = None,
    yarn_original_max: int | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence's queries q [Lq, Hq, D] -> (out [Lq, Hq, D], lse [Hq, Lq]).

    Keys: block_table [max_blocks] (or [1, max_blocks]) over a paged cache k/v
    [num_blocks, page, Hkv, D]; or block_table None and contiguous k/v [Lk, Hkv, D] (key
    position = row). Query i is at absolute position q_pos0 + i; keys [k_start, k_end) are
    visible (k_end defaults to q_pos0 + Lq paged, Lk contiguous), causally clipped if causal.
    rope_theta: q is unrotated and rotated in the kernel (keys are cached rotated).
    dca: keys cached at p mod c, three query rotations (needs rope_theta); k_start/k_end
    still clip. yarn_original_max: YaRN logit scaling per query (None or 0: off).
    out/lse: optional preallocated results. config: tile sizes (default by head_dim).
    k_scale/v_scale: an fp8 cache's float32 scales, k.shape[:-1]; k_zero: its keys' zero
    point [Hkv, D] float32 (None: zero) (module doc).
    """
    lq = q.shape[0]
    if block_table is not None and block_table.dim() == 1:
        block_table = block_table[None]
    if k_end is None:
        k_end = q_pos0 + lq if block_table is not None else k.shape[0]
    limit = k.shape[0] if block_table is None else block_table.shape[1] * k.shape[1]
    if k_start < 0 or k_end > limit:
        raise ValueError(f"key range [{k_start}, {k_end}) exceeds the {limit} keys available")
    if dca is not None and k_end <= dca.chunk_size - dca.local_size:
        dca = None  # every query and key in the first DCA chunk: DCA is RoPE attention there
    # one device tensor [0, lq, q_pos0, k_start, k_end], sliced into the varlen arguments
    args = _int32_args(q.device, (0, lq, q_pos0, k_start, k_end))
    return flash_prefill_varlen(
        q,
        k,
        v,
        scale=scale,
        cu_seqlens_q=args[0:2],
        max_seqlen_q=lq,
        q_pos0=args[2:3],
        k_start=args[3:4],
        k_end=args[4:5],
        block_table=block_table,
        causal=causal,
        rope_theta=rope_theta,
        dca=dca,
        yarn_original_max=yarn_original_max,
        config=config,
        out=out,
        lse=lse,
        k_scale=k_scale,
        v_scale=v_scale,
        k_zero=k_zero,
        host=HostLayout((lq,), (q_pos0,), (k_start,), (k_end,)),
    )


def flash_prefill_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    q_pos0: torch.Tensor,
    k_end: torch.Tensor,
    k_start: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    rope_theta: float | None = None,
    dca: DCAParams | None = None,
    yarn_original_max: int | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_zero: torch.Tensor | None = None,
    host: HostLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen batch: q [T, Hq, D] holds B sequences, sequence s at rows
    cu_seqlens_q[s]:cu_seqlens_q[s+1] (int32 [B+1]); q_pos0, k_start, k_end: int32 [B];
    block_table [B, max_blocks] must cover k_end[s] tokens of sequence s. max_seqlen_q (host
    int) sizes the grid. k_scale/v_scale: an fp8 cache's scales [num_blocks, page, Hkv]
    (contiguous keys: [Lk, Hkv]), k_zero its keys' zero point [Hkv, D]. host: the same
    per-sequence integers on the host, which lets DCA run on the Hopper kernel (split at
    chunk boundaries). Returns (out [T, Hq, D], lse [Hq, T] float32 natural log)."""
    _check_prefill_inputs(q, k, v, block_table, k_scale, v_scale)
    k_zero = key_zero_point(k_zero, k_scale, k.shape[-2], q.shape[2], q.device)
    nseq = cu_seqlens_q.shape[0] - 1
    if k_start is None:
        k_start = _int32_args(q.device, (0,) * nseq)
    paged = block_table is not None
    if not paged:  # contiguous [Lk, Hkv, D] is one page holding every key
        k, v = k[None], v[None]
        if k_scale is not None:
            k_scale, v_scale = k_scale[None], v_scale[None]
        if nseq != 1:
            raise ValueError("contiguous k/v serve a single sequence; use a block table")
    var = make_variant(q.shape[2], q.device, rope_theta, dca, yarn_original_max)
    out = torch.empty_like(q) if out is None else out
    if lse is None:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    if out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]) or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} do not fit q")
    if out.dtype != q.dtype or out.data_ptr() == q.data_ptr():
        # the kernel stages rotated queries in out's rows: same dtype, no aliasing
        raise ValueError("out must have q's dtype and must not alias q")
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out, lse
    fp8 = k_scale is not None
    hopper = (
        config is None and (var.rope or not var.yarn) and ws.supported(q, k, v, out, paged, fp8)
    )
    if hopper and var.dca and host is not None:
        if sum(host.q_lens) != q.shape[0] or len(host.q_lens) != nseq:
            raise ValueError(f"host layout {host} does not describe q {tuple(q.shape)}")
        _dca_prefill_hopper(q, k, v, out, lse, scale, block_table, host, var)
        return out, lse
    if hopper and not var.dca:
        if var.rope:  # the Hopper kernel takes rotated queries: rotate them into out's rows
            rotate_queries(q, out, cu_seqlens_q, q_pos0, max_seqlen_q, var)
        ws.flash_prefill_ws(
            out if var.rope else q,
            k,
            v,
            out,
            lse,
            qk_scale_log2=scale * LOG2E,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q,
            q_pos0=q_pos0,
            k_start=k_start,
            k_end=k_end,
            block_table=block_table,
            causal=causal,
            yarn_inv_orig=var.yarn_inv_orig,
        )
        return out, lse
    _launch_prefill(
        q,
        k,
        v,
        block_table,
        out,
        lse,
        cu_seqlens_q,
        q_pos0,
        k_start,
        k_end,
        scale,
        var,
        causal,
        max_seqlen_q,
        config or prefill_config(q.shape[2], k.shape[1] if paged else None, q.element_size()),
        k_scale,
        v_scale,
        k_zero,
    )
    return out, lse


def rotate_queries(
    q: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_pos0: torch.Tensor,
    max_seqlen_q: int,
    var: _Variant,
) -> torch.Tensor:
    """RoPE of q [T, Hq, D] at each row's absolute position q_pos0[s] +
    (i - cu_seqlens_q[s]) into out [T, Hq, D] (may alias q); with var.dca, out is [3, T, Hq, D]
    and holds the inter / successive / intra rotations."""
    block_m = 64 if _INTERPRET else 32
    grid = (-(-max_seqlen_q // block_m), q.shape[1], cu_seqlens_q.shape[0] - 1)
    _rotate_queries_kernel[grid](
        q,
        out,
        cu_seqlens_q,
        q_pos0,
        var.inv_freq,
        var.dca_chunk_len,
        var.dca_chunk_size,
        q.stride(0),
        q.stride(1),
        out.stride(-3),
        out.stride(-2),
        out.stride(0) if var.dca else 0,
        HEAD_DIM=q.shape[2],
        BLOCK_M=block_m,
        DCA=var.dca,
        FAST_TRIG=not _INTERPRET,
    )
    return out


def merge_parts(
    parts: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """out, lse = the log-sum-exp merge of parts [P, T, Hq, D] (contiguous) with part_lse
    [Hq, P * T] (part p's row r at column p * T + r); out [T, Hq, D], lse [Hq, T]."""
    n_parts, t, hq, d = parts.shape
    block_m = 64 if _INTERPRET else 32
    _merge_parts_kernel[(-(-t // block_m), hq)](
        parts,
        part_lse,
        out,
        lse,
        t,
        part_lse.stride(0),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        NUM_PARTS=n_parts,
        HEAD_DIM=d,
        BLOCK_M=block_m,
    )


@dataclass(frozen=True)
class HostLayout:
    """Host copies of a varlen call's per-sequence integers (the scheduler knows them): what
    splitting DCA's query rows at chunk boundaries needs without reading the GPU."""

    q_lens: tuple[int, ...]
    q_pos0: tuple[int, ...]
    k_start: tuple[int, ...]
    k_end: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def _dca_plan(host: HostLayout, chunk_len: int) -> tuple[tuple[int, ...], ...]:
    """DCA as a varlen batch for the Hopper kernel. Each sequence's query rows are cut where
    their DCA chunk n = p // c changes; a segment is then, per part, a plain key range seen by
    every row with one query rotation: inter [k_start, (n-1)c), successive [(n-1)c, nc),
    intra [nc, p] (causal; the other two lie wholly before p, so the causal mask is a no-op
    there). Pseudo-sequences run part-major (row r of part p is row p * T + r of the rotated
    queries), an empty range where a part has no keys. Returns (cu, q_pos0, k_start, k_end,
    sequence index, max rows) as tuples."""
    segments = []  # (sequence, first row, rows, first position, n)
    row = 0
    for s, (lq, p0) in enumerate(zip(host.q_lens, host.q_pos0)):
        p = p0
        while p < p0 + lq:
            n = p // chunk_len
            end = min(p0 + lq, (n + 1) * chunk_len)
            segments.append((s, row + p - p0, end - p, p, n))
            p = end
        row += lq
    total = row
    cu, pos0, k_lo, k_hi, seq = [0], [], [], [], []
    for part in range(3):
        for s, first, rows, p, n in segments:
            ks, ke = host.k_start[s], host.k_end[s]
            if part == 0:
                lo, hi = ks, (n - 1) * chunk_len
            elif part == 1:
                lo, hi = (n - 1) * chunk_len, n * chunk_len
            else:
                lo, hi = n * chunk_len, ke
            lo, hi = max(lo, ks), min(hi, ke)
            if lo >= hi:
                lo = hi = 0
            cu.append(part * total + first + rows)
            pos0.append(p)
            k_lo.append(lo)
            k_hi.append(hi)
            seq.append(s)
    max_rows = max((seg[2] for seg in segments), default=0)
    return tuple(cu), tuple(pos0), tuple(k_lo), tuple(k_hi), tuple(seq), (max_rows,)


def _dca_prefill_hopper(
    q, k, v, out, lse, scale, block_table, host: HostLayout, var: _Variant
) -> None:
    """DCA prefill on the Hopper kernel: the three rotated query variants (one pre-pass), one
    varlen launch over the (segment, part) pseudo-sequences, one LSE merge."""
    t, hq, d = q.shape
    cu, pos0, k_lo, k_hi, seq, (max_rows,) = _dca_plan(host, var.dca_chunk_len)
    dev = q.device
    q_parts = torch.empty((3, t, hq, d), dtype=q.dtype, device=dev)
    cu_q = _int32_args(dev, (0, *itertools.accumulate(host.q_lens)))
    rotate_queries(q, q_parts, cu_q, _int32_args(dev, host.q_pos0), max(host.q_lens), var)
    out_parts = torch.empty_like(q_parts)
    lse_parts = torch.empty((hq, 3 * t), dtype=torch.float32, device=dev)
    table = None
    if block_table is not None:
        table = block_table.index_select(0, _int64_args(dev, seq))
    ws.flash_prefill_ws(
        q_parts.view(3 * t, hq, d),
        k,
        v,
        out_parts.view(3 * t, hq, d),
        lse_parts,
        qk_scale_log2=scale * LOG2E,
        cu_seqlens_q=_int32_args(dev, cu),
        max_seqlen_q=max_rows,
        q_pos0=_int32_args(dev, pos0),
        k_start=_int32_args(dev, k_lo),
        k_end=_int32_args(dev, k_hi),
        block_table=table,
        causal=True,
        yarn_inv_orig=var.yarn_inv_orig,
    )
    merge_parts(out_parts, lse_parts, out, lse)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, paged: bool, cfg: KernelConfig):
    """(K_DESC, V_DESC) over the caches [blocks, page, Hkv, D] viewed as rows
    [blocks * page, Hkv * D], block [BLOCK_N, D]; (None, None) when descriptors don't fit
    (config off, the interpreter's bf16 upcast, pages not a multiple of BLOCK_N, rows not
    contiguous). Contiguous keys come as one page [1, Lk, Hkv, D]: rows = key positions.
    Built per call (a few us): a cache of them would keep freed KV caches alive."""
    blocks, page, hkv, d = k.shape
    if not cfg.tma or TensorDescriptor is None or (paged and page % cfg.block_n):
        return None, None
    if k.dtype == FP8_DTYPE:  # fp8 caches: pointer loads (descriptors not validated there)
        return None, None
    if dtype_flags(k.dtype)[0] or blocks * page >= 2**31:
        return None, None
    if k.stride() != (page * hkv * d, hkv * d, d, 1):
        return None, None
    shape, strides, block = [blocks * page, hkv * d], [hkv * d, 1], [cfg.block_n, d]
    return (
        TensorDescriptor(k, shape, strides, block),
        TensorDescriptor(v, shape, strides, block),
    )


def _launch_prefill(
    q,
    k,
    v,
    block_table,
    out,
    lse,
    cu_q,
    q_pos0,
    k_start,
    k_end,
    scale,
    var: _Variant,
    causal: bool,
    max_seqlen_q: int,
    cfg: KernelConfig,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_zero: torch.Tensor | None = None,
) -> None:
    paged = block_table is not None
    fp8 = k_scale is not None
    s_strides = k_scale.stride() if fp8 else (0, 0, 0)
    k_desc, v_desc = _kv_descriptors(k, v, paged, cfg)
    bt = block_table if paged else cu_q  # any int pointer when not paged (never read)
    upcast, dot_prec = dtype_flags(q.dtype)
    q_strides, k_strides, o_strides = q.stride(), k.stride(), out.stride()
    grid = (-(-max_seqlen_q // cfg.block_m), q.shape[1], cu_q.shape[0] - 1)
    _flash_prefill_kernel[grid](
        q,
        k,
        v,
        k_desc,
        v_desc,
        k_scale,
        v_scale,
        k_zero,
        bt,
        out,
        lse,
        cu_q,
        q_pos0,
        k_start,
        k_end,
        var.inv_freq if var.rope else q,
        scale * LOG2E,
        var.yarn_inv_orig,
        var.dca_chunk_len,
        var.dca_chunk_size,
        q_strides[0],
        q_strides[1],
        k_strides[0],
        k_strides[1],
        k_strides[2],
        s_strides[0],
        s_strides[1],
        s_strides[2],
        o_strides[0],
        o_strides[1],
        lse.stride(0),
        bt.stride(0) if paged else 0,
        GROUPS=q.shape[1] // k.shape[2],
        HEAD_DIM=q.shape[2],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PAGE_SIZE=k.shape[1] if paged else cfg.block_n,
        PAGED=paged,
        CAUSAL=causal,
        ROPE=var.rope,
        DCA=var.dca,
        YARN=var.yarn,
        UPCAST=upcast,
        DOT_PREC=dot_prec,
        FAST_TRIG=not _INTERPRET,
        TMA=k_desc is not None,
        KV_FP8=fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
