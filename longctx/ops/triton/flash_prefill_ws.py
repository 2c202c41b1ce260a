"""Warp-specialized flash-attention forward for Hopper (sm_90), written in Gluon.

The Triton kernel of flash_prefill.py tops out near 490 TFLOP/s on H100/H200 (7B heads,
causal, 128-token pages): Triton 3.6 pipelines each K/V tile with CTA-wide barriers, so the
two warpgroups of a program do QK^T, softmax and P @ V in lockstep and the tensor core idles
while the softmax (exp2 on the MUFU unit, ~half the tensor-core time per tile) runs
(benchmarks/results/attention_tuning_notes.md). This kernel splits the work as cuDNN / FA3
do, with explicit warp specialization:

    loader      1 warp    TMA loads of the two query tiles and of K/V tiles into a ring of
                          STAGES slots; waits on a slot's "empty" barriers before reuse
    compute 0   4 warps   query rows [0, 64) of the program's 128: S = Q K^T, online softmax,
    compute 1   4 warps   O += P V; query rows [64, 128); each arrives on a slot's "empty"
                          barrier as soon as its wgmma finished reading it

The two compute warpgroups share the K/V ring but no CTA barrier. Per tile, a warpgroup
issues P(j-1) @ V(j-1) and Q K(j)^T back to back, waits once, then runs the softmax of tile
j; the warpgroups pass a "turn" token (an mbarrier pair) around their GEMM groups, so one's
softmax (MUFU, FP32) overlaps the other's wgmma (FA3's ping-pong). H100, 7B heads, causal,
128-token pages, one call: 644 TFLOP/s at 32K and 633 at 128K, against 503 / 492 for the
Triton kernel and 620 / 567 for cuDNN (the steps: two independent warpgroups with a wait
per GEMM 567 / 561, grouped GEMMs 637 / 630, ping-pong 644 / 633).

Tried and dropped: FA3's intra-warpgroup overlap (S of tile j+1 issued before the softmax of
tile j). With S(j+1), S(j), P and O live, ptxas (CUDA 12.9 of triton 3.6) serializes every
wgmma for lack of registers at 240 per thread (502 TFLOP/s).

Scope (the engine's hot path; everything else stays on the Triton kernel): bf16/fp16
queries and cache, head_dim 64 or 128, dense attention (no in-kernel RoPE / DCA: callers
pass rotated queries; YaRN's f(p)^2 is applied to the logits), causal (bottom-right, query
at position p sees keys [k_start, min(p + 1, k_end))) or a key range, a varlen batch of
sequences over the paged cache (a 128-key tile is one page, or 2-8 whole pages of 16-64 keys
loaded as one TMA box each) or contiguous keys, GQA without repeating K/V. Same conventions
as flash_prefill_varlen: out [T, Hq, D], lse [Hq, T] float32 natural log; a query without keys
gets out 0 and lse -inf.

Gluon has no interpreter: on the CPU the kernel is only compiled for sm_90 (tests/ops/
test_triton_compile.py); its numerics are checked on the GPU against the float64
reference (tests/gpu/test_flash_prefill_ws.py, benchmarks/bench_attention_gpu.py).
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - triton without Gluon
    HAVE_GLUON = False

BLOCK_M = 64  # query rows per compute warpgroup (one wgmma M); a program owns 2 x 64
BLOCK_N = 128  # keys per tile: one page of >= 128 keys, or 2-8 whole pages of 16-64
STAGES = 2  # K/V ring: 32 KiB of queries + 2 x 64 KiB of K/V + 2 x 32 KiB of tail V = 224 KiB
HEAD_DIMS = (64, 128)
# Register split (setmaxnreg): the loader needs few, the compute warpgroups take the rest.
LOADER_REGS = 24
COMPUTE_REGS = 240


def supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, paged: bool, fp8: bool
) -> bool:
    """Whether this kernel serves a flash_prefill_varlen call (k [blocks, page, Hkv, D]): an
    sm_90 GPU with Gluon, 16-bit dtypes, no fp8 cache, head_dim 64/128, pages of 16, 32, 64
    or a multiple of 128 keys, rows the TMA can address (unit-stride heads, 16-byte aligned
    rows, int32 row indices), contiguous out (it holds the rotated queries)."""
    if not HAVE_GLUON or not q.is_cuda or fp8:
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype:
        return False
    d = q.shape[2]
    if d not in HEAD_DIMS or q.stride(2) != 1 or q.stride(1) != d or q.stride(0) % 8:
        return False
    if q.data_ptr() % 16 or k.data_ptr() % 16 or v.data_ptr() % 16:
        return False
    blocks, page, hkv, _ = k.shape
    if not out.is_contiguous():
        return False
    if paged and page % BLOCK_N and (BLOCK_N % page or page < 16):
        return False  # a tile is one page, or whole pages of >= 16 rows (one TMA box each)
    strides = (page * hkv * d, hkv * d, d, 1)
    return k.stride() == strides and v.stride() == strides and blocks * page < 2**31


if HAVE_GLUON:
    # a barrier over the calling partition's warps (renamed between triton 3.6 and 3.7)
    _partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def _load_partition(
        q_desc,
        k_desc,
        v_desc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        k_ready,
        v_ready,
        k_empty,
        v_empty,
        BT,
        q_row,
        q_col,
        kv_col,
        n_lo,
        n_hi,
        k_end,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BOX: gl.constexpr,
        PAGE_SIZE: gl.constexpr,
        PAGED: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M, q_col], q_bar, q_smem.index(1))
        for j in range(n_lo, n_hi):
            i = j - n_lo
            s = i % STAGES
            # a fresh barrier counts as having completed the phase before phase 0, so the
            # first pass over the ring does not wait
            phase = ((i // STAGES) & 1) ^ 1
            key0 = j * BLOCK_N
            # a tile is BLOCK_N // BOX boxes of BOX rows, one per cache page when pages are
            # shorter than a tile. Boxes wholly past k_end (whose block-table entries may not
            # exist) load block 0 instead: their keys are masked and their values zero-padded
            # on the compute side, and the byte count each barrier expects stays fixed.
            mbarrier.wait(k_empty.index(s), phase)
            mbarrier.expect(k_ready.index(s), (BLOCK_N // BOX) * k_desc.block_type.nbytes)
            for b in gl.static_range(BLOCK_N // BOX):
                row = _box_row(BT, key0 + b * BOX, k_end, PAGE_SIZE, PAGED)
                tma.async_copy_global_to_shared(
                    k_desc, [row, kv_col], k_ready.index(s), k_smem.index(s).slice(b * BOX, BOX)
                )
            mbarrier.wait(v_empty.index(s), phase)
            mbarrier.expect(v_ready.index(s), (BLOCK_N // BOX) * v_desc.block_type.nbytes)
            for b in gl.static_range(BLOCK_N // BOX):
                row = _box_row(BT, key0 + b * BOX, k_end, PAGE_SIZE, PAGED)
                tma.async_copy_global_to_shared(
                    v_desc, [row, kv_col], v_ready.index(s), v_smem.index(s).slice(b * BOX, BOX)
                )

    @gluon.jit
    def _box_row(BT, key, k_end, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr):
        """Cache row (block * PAGE_SIZE + offset) of key position `key` (contiguous keys: the
        position itself); block 0 for keys at or past k_end."""
        if PAGED:
            block = gl.load(BT + key // PAGE_SIZE, mask=key < k_end, other=0)
            return (block * PAGE_SIZE + key % PAGE_SIZE).to(gl.int32)
        else:
            return key

    @gluon.jit
    def _masked_logits(
        s,
        key0,
        pos,
        k_start,
        k_end,
        CAUSAL: gl.constexpr,
        BLOCK_N: gl.constexpr,
        layout: gl.constexpr,
    ):
        kpos = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        ok = (kpos >= k_start) & (kpos < k_end)
        ok2 = gl.expand_dims(ok, 0)
        if CAUSAL:
            ok2 = ok2 & (gl.expand_dims(kpos, 0) <= gl.expand_dims(pos, 1))
        return gl.where(ok2, s, float("-inf"))

    @gluon.jit
    def _softmax_step(
        s,
        m_i,
        l_i,
        key0,
        pos,
        diag_key,
        k_start,
        k_end,
        qk_scale,
        CAUSAL: gl.constexpr,
        BLOCK_N: gl.constexpr,
        s_layout: gl.constexpr,
        o_layout: gl.constexpr,
        p_layout: gl.constexpr,
        DTYPE: gl.constexpr,
    ):
        """Online-softmax update for one tile of logits s: (P as the wgmma A operand,
        the rescale factor of acc's rows in acc's layout, new m, new l)."""
        needs_mask = (key0 < k_start) | (key0 + BLOCK_N > k_end)
        if CAUSAL:
            needs_mask = needs_mask | (key0 > diag_key)
        if needs_mask:
            s = _masked_logits(s, key0, pos, k_start, k_end, CAUSAL, BLOCK_N, s_layout)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * gl.expand_dims(qk_scale, 1) - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(DTYPE), p_layout)
        return p_op, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), m_new, l_i

    @gluon.jit
    def _zero_padded_copy(src, dst, valid_rows, ROWS: gl.constexpr, COLS: gl.constexpr):
        """dst = src with rows >= valid_rows zeroed, ready for wgmma (4 warps)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        x = src.load(layout)
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        x = gl.where(gl.expand_dims(rows < valid_rows, 1), x, gl.zeros_like(x))
        dst.store(x)
        fence_async_shared()  # generic-proxy stores -> visible to the wgmma (async proxy)
        _partition_barrier()

    @gluon.jit
    def _attend_pingpong(
        q_tile,
        k_smem,
        v_smem,
        v_tail,
        k_ready,
        v_ready,
        k_empty,
        v_empty,
        turn,
        acc,
        m_i,
        l_i,
        pos,
        diag_key,
        k_start,
        k_end,
        n_lo,
        n_hi,
        qk_scale,
        WHICH: gl.constexpr,
        CAUSAL: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        s_layout: gl.constexpr,
        o_layout: gl.constexpr,
        p_layout: gl.constexpr,
    ):
        """The tile loop. The GEMMs of a step are grouped: P(j-1) @ V(j-1) and Q K(j)^T are
        issued back to back and awaited once, then the softmax of tile j runs (one wgmma wait
        per tile instead of two). The two compute warpgroups take turns for their GEMM groups
        (an mbarrier "turn" token passed back and forth, FA3's inter-warpgroup ping-pong): one's
        softmax runs while the other's GEMMs use the tensor core, instead of both issuing when
        the same K/V tile lands. H100, 7B heads, causal, same call, 32K / 128K TFLOP/s: one
        wait per GEMM 567 / 561, grouped 637 / 630, grouped + ping-pong 644 / 633 (cuDNN
        620 / 567)."""
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        n = n_hi - n_lo
        if n > 0:
            # warpgroup 0 holds the token first: a fresh barrier passes a wait on parity 1
            mbarrier.wait(turn.index(WHICH), (1 - WHICH) & 1)
            mbarrier.wait(k_ready.index(0), 0)
            s_tok = warpgroup_mma(
                q_tile, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            s_cur = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(turn.index(1 - WHICH), count=1)
            mbarrier.arrive(k_empty.index(0), count=1)
            p_op, alpha, m_i, l_i = _softmax_step(
                s_cur,
                m_i,
                l_i,
                n_lo * BLOCK_N,
                pos,
                diag_key,
                k_start,
                k_end,
                qk_scale,
                CAUSAL,
                BLOCK_N,
                s_layout,
                o_layout,
                p_layout,
                q_tile.dtype,
            )
            for i in range(1, n):
                prev = (i - 1) % STAGES
                slot = i % STAGES
                mbarrier.wait(turn.index(WHICH), (i + 1 - WHICH) & 1)
                mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
                o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                mbarrier.wait(k_ready.index(slot), (i // STAGES) & 1)
                s_tok = warpgroup_mma(
                    q_tile, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
                )
                acc, s_cur = warpgroup_mma_wait(0, deps=[o_tok, s_tok])
                mbarrier.arrive(turn.index(1 - WHICH), count=1)
                mbarrier.arrive(v_empty.index(prev), count=1)
                mbarrier.arrive(k_empty.index(slot), count=1)
                p_op, alpha, m_i, l_i = _softmax_step(
                    s_cur,
                    m_i,
                    l_i,
                    (n_lo + i) * BLOCK_N,
                    pos,
                    diag_key,
                    k_start,
                    k_end,
                    qk_scale,
                    CAUSAL,
                    BLOCK_N,
                    s_layout,
                    o_layout,
                    p_layout,
                    q_tile.dtype,
                )
                acc = acc * gl.expand_dims(alpha, 1)
            last = (n - 1) % STAGES
            key0 = (n_hi - 1) * BLOCK_N
            mbarrier.wait(turn.index(WHICH), (n + 1 - WHICH) & 1)
            mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
            if key0 + BLOCK_N > k_end:
                # the rows past k_end are cache slots no token wrote (torch.empty: maybe NaN,
                # and P = 0 times NaN is NaN): P @ V reads a zero-padded copy
                _zero_padded_copy(v_smem.index(last), v_tail, k_end - key0, BLOCK_N, HEAD_DIM)
                o_tok = warpgroup_mma(p_op, v_tail, acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[o_tok])
            else:
                o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(turn.index(1 - WHICH), count=1)
            mbarrier.arrive(v_empty.index(last), count=1)
        return acc, m_i, l_i

    @gluon.jit
    def _compute_partition(
        q_smem,
        k_smem,
        v_smem,
        v_tail_smem,
        q_bar,
        k_ready,
        v_ready,
        k_empty,
        v_empty,
        turn,
        Out,
        LSE,
        out_row0,
        rows_left,
        pos0,
        k_start,
        k_end,
        n_lo,
        n_hi,
        qk_scale,
        yarn_inv_orig,
        stride_ot,
        WHICH: gl.constexpr,
        CAUSAL: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr,
        YARN: gl.constexpr,
    ):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        dtype: gl.constexpr = q_smem.dtype

        q_tile = q_smem.index(WHICH)
        v_tail = v_tail_smem.index(WHICH)
        pos0 = pos0 + WHICH * BLOCK_M
        rows_left = rows_left - WHICH * BLOCK_M
        out_row0 = out_row0 + WHICH * BLOCK_M
        pos = pos0 + gl.arange(0, BLOCK_M, layout=row_layout)
        # logit multiplier per row: softmax scale * log2(e), times YaRN's f(p)^2, applied to
        # the float32 logits as in the Triton kernel (on a bf16 query it would round)
        qk_scale = gl.full([BLOCK_M], qk_scale, gl.float32, layout=row_layout)
        if YARN:
            f = gl.maximum(0.1 * gl.log((pos + 1).to(gl.float32) * yarn_inv_orig) + 1.0, 1.0)
            qk_scale = qk_scale * f * f
        # A finite floor instead of -inf: a row whose keys are all masked so far keeps
        # exp2(m_old - m_new) = 1 and p = 0 instead of NaN.
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        # tiles past this one need the causal mask for some row of this warpgroup
        diag_key = pos0 + 1 - BLOCK_N

        mbarrier.wait(q_bar, 0)
        acc, m_i, l_i = _attend_pingpong(
            q_tile,
            k_smem,
            v_smem,
            v_tail,
            k_ready,
            v_ready,
            k_empty,
            v_empty,
            turn,
            acc,
            m_i,
            l_i,
            pos,
            diag_key,
            k_start,
            k_end,
            n_lo,
            n_hi,
            qk_scale,
            WHICH,
            CAUSAL,
            BLOCK_M,
            BLOCK_N,
            HEAD_DIM,
            STAGES,
            s_layout,
            o_layout,
            p_layout,
        )

        has_keys = l_i > 0.0
        l_safe = gl.where(has_keys, l_i, 1.0)
        lse = gl.where(has_keys, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
        rows_o = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = (
            Out
            + gl.expand_dims((out_row0 + rows_o).to(gl.int64) * stride_ot, 1)
            + gl.expand_dims(cols_o, 0)
        )
        gl.store(o_ptrs, out.to(dtype), mask=gl.expand_dims(rows_o < rows_left, 1))
        rows_s = gl.arange(0, BLOCK_M, layout=row_layout)
        gl.store(LSE + out_row0 + rows_s, lse, mask=rows_s < rows_left)

    @gluon.jit(do_not_specialize=["stride_lh", "stride_bt"])
    def _flash_prefill_ws_kernel(
        q_desc,
        k_desc,
        v_desc,
        Out,
        LSE,
        BT,
        CU_Q,
        Q_POS0,
        K_START,
        K_END,
        qk_scale,
        yarn_inv_orig,
        stride_ot,
        stride_oh,
        stride_lh,
        stride_bt,
        GROUPS: gl.constexpr,
        HEAD_DIM: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        BOX: gl.constexpr,
        PAGE_SIZE: gl.constexpr,
        PAGED: gl.constexpr,
        CAUSAL: gl.constexpr,
        STAGES: gl.constexpr,
        YARN: gl.constexpr,
        COMPUTE_REGS: gl.constexpr,
        LOADER_REGS: gl.constexpr,
    ):
        # programs run latest query block first: under a causal mask those carry most keys
        start_m = (gl.num_programs(0) - 1 - gl.program_id(0)) * (2 * BLOCK_M)
        head = gl.program_id(1)
        seq = gl.program_id(2)
        q_begin = gl.load(CU_Q + seq)
        q_len = gl.load(CU_Q + seq + 1) - q_begin
        if start_m < q_len:
            q_pos0 = gl.load(Q_POS0 + seq)
            k_start = gl.load(K_START + seq)
            k_end = gl.load(K_END + seq)
            key_hi = k_end
            if CAUSAL:
                key_hi = gl.minimum(k_end, q_pos0 + gl.minimum(start_m + 2 * BLOCK_M, q_len))
            n_lo = k_start // BLOCK_N
            n_hi = gl.maximum(gl.cdiv(key_hi, BLOCK_N), n_lo)
            dtype: gl.constexpr = q_desc.dtype

            q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
            k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
            v_tail = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
            bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
            q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
            k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
            v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
            k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
            v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
            turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
            mbarrier.init(q_bar, count=1)
            for st in gl.static_range(STAGES):
                mbarrier.init(k_ready.index(st), count=1)
                mbarrier.init(v_ready.index(st), count=1)
                mbarrier.init(k_empty.index(st), count=2)  # both compute warpgroups
                mbarrier.init(v_empty.index(st), count=2)
            mbarrier.init(turn.index(0), count=1)
            mbarrier.init(turn.index(1), count=1)
            fence_async_shared()

            out_row0 = q_begin + start_m
            rows_left = q_len - start_m
            pos0 = q_pos0 + start_m
            Out_h = Out + head.to(gl.int64) * stride_oh
            LSE_h = LSE + head.to(gl.int64) * stride_lh
            BT_s = BT + seq.to(gl.int64) * stride_bt
            gl.warp_specialize(
                [
                    (
                        _compute_partition,
                        (
                            q_smem,
                            k_smem,
                            v_smem,
                            v_tail,
                            q_bar,
                            k_ready,
                            v_ready,
                            k_empty,
                            v_empty,
                            turn,
                            Out_h,
                            LSE_h,
                            out_row0,
                            rows_left,
                            pos0,
                            k_start,
                            k_end,
                            n_lo,
                            n_hi,
                            qk_scale,
                            yarn_inv_orig,
                            stride_ot,
                            0,
                            CAUSAL,
                            BLOCK_M,
                            BLOCK_N,
                            HEAD_DIM,
                            STAGES,
                            YARN,
                        ),
                    ),
                    (
                        _compute_partition,
                        (
                            q_smem,
                            k_smem,
                            v_smem,
                            v_tail,
                            q_bar,
                            k_ready,
                            v_ready,
                            k_empty,
                            v_empty,
                            turn,
                            Out_h,
                            LSE_h,
                            out_row0,
                            rows_left,
                            pos0,
                            k_start,
                            k_end,
                            n_lo,
                            n_hi,
                            qk_scale,
                            yarn_inv_orig,
                            stride_ot,
                            1,
                            CAUSAL,
                            BLOCK_M,
                            BLOCK_N,
                            HEAD_DIM,
                            STAGES,
                            YARN,
                        ),
                    ),
                    (
                        _load_partition,
                        (
                            q_desc,
                            k_desc,
                            v_desc,
                            q_smem,
                            k_smem,
                            v_smem,
                            q_bar,
                            k_ready,
                            v_ready,
                            k_empty,
                            v_empty,
                            BT_s,
                            out_row0,
                            head * HEAD_DIM,
                            (head // GROUPS) * HEAD_DIM,
                            n_lo,
                            n_hi,
                            k_end,
                            BLOCK_M,
                            BLOCK_N,
                            BOX,
                            PAGE_SIZE,
                            PAGED,
                            STAGES,
                        ),
                    ),
                ],
                [4, 1],
                [COMPUTE_REGS, LOADER_REGS],
            )


def _descriptor(
    x: torch.Tensor, rows: int, cols: int, row_stride: int, block: list[int]
) -> GluonDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(
        block, gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    )
    return GluonDescriptor(x, [rows, cols], [row_stride, 1], block, layout)


def flash_prefill_ws(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    qk_scale_log2: float,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    q_pos0: torch.Tensor,
    k_start: torch.Tensor,
    k_end: torch.Tensor,
    block_table: torch.Tensor | None,
    causal: bool,
    yarn_inv_orig: float = 0.0,
) -> None:
    """Launch on arguments flash_prefill_varlen has validated (see supported()): k/v are
    [blocks, page, Hkv, D] (contiguous keys as one page), out/lse preallocated,
    qk_scale_log2 = softmax scale * log2(e); yarn_inv_orig = 1 / original_max turns on YaRN's
    f(p)^2 on the logits of the query at p (0: off)."""
    t, hq, d = q.shape
    blocks, page, hkv, _ = k.shape
    q_desc = _descriptor(q, t, hq * d, q.stride(0), [BLOCK_M, d])
    paged = block_table is not None
    box = min(page, BLOCK_N) if paged else BLOCK_N  # TMA box rows: one page at most
    k_desc = _descriptor(k, blocks * page, hkv * d, hkv * d, [box, d])
    v_desc = _descriptor(v, blocks * page, hkv * d, hkv * d, [box, d])
    bt = block_table if paged else cu_seqlens_q
    grid = (-(-max_seqlen_q // (2 * BLOCK_M)), hq, cu_seqlens_q.shape[0] - 1)
    _flash_prefill_ws_kernel[grid](
        q_desc,
        k_desc,
        v_desc,
        out,
        lse,
        bt,
        cu_seqlens_q,
        q_pos0,
        k_start,
        k_end,
        qk_scale_log2,
        yarn_inv_orig,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        bt.stride(0) if paged else 0,
        GROUPS=hq // hkv,
        HEAD_DIM=d,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BOX=min(page, BLOCK_N) if paged else BLOCK_N,
        PAGE_SIZE=page if paged else BLOCK_N,
        PAGED=paged,
        CAUSAL=causal,
        STAGES=STAGES,
        YARN=yarn_inv_orig > 0.0,
        COMPUTE_REGS=COMPUTE_REGS,
        LOADER_REGS=LOADER_REGS,
        num_warps=4,
    )
