"""Index-estimation scores with two Triton passes (the GPU path of
longctx/sparse/estimate.py:part_scores, which is its PyTorch reference).

The PyTorch version writes bf16 logits, then float32 probabilities in several memory-bound
elementwise passes (at 1M keys ~40 of its ~45 ms; the matmuls are ~3 ms). Here:

    pass 1  program (q head, slot), looping over key tiles slot, slot + SLOTS, ...: logits
            of the R estimation rows against BN keys (tensor cores), per row an online max
            and sum of exp -> [H, SLOTS, R]; torch merges them over the slots of every part
            into the row's log-sum-exp (the softmax runs over the union of the parts)
    pass 2  the same tiles again: p = exp(x - lse), column sums straight to the vertical
            scores, p written once, in float32, into the DiagonalSums buffer whose strided
            read gives the slash scores (a fold part's program visits its folded tile in
            every period and writes the sum; tiles shrink to divide the fold, 16 at least,
            else the PyTorch scores serve)

so the probabilities are written once and read once. Heads go through pass 2 a group at a
time, bounding the buffer as part_scores does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from longctx.ops.triton.flash_prefill import dtype_flags
from longctx.sparse.estimate import SCORE_ELEMENTS, DiagonalSums, SparsePart, part_scores

Tensor = torch.Tensor

BLOCK_N = 64  # keys per tile
SLOTS = 128  # pass-1 programs per head


@triton.jit
def _scaled_logits(
    q, k_ptr, cols, h, r, d, key_hi, est_pos0, rows, scale, stride_kl, stride_kh,
    GROUPS: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Logits [R_pad, BN] of the rows against keys `cols`, times the scale, and which count
    (real rows, keys of the part, causal bound)."""
    k = tl.load(
        k_ptr + cols[:, None] * stride_kl + (h // GROUPS) * stride_kh + d[None, :],
        mask=cols[:, None] < key_hi,
    )
    if UPCAST:
        k = k.to(tl.float32)
    x = tl.dot(q, tl.trans(k)) * scale
    ok = (r[:, None] < rows) & (cols[None, :] < key_hi)
    if CAUSAL:
        ok &= cols[None, :] <= est_pos0 + r[:, None]
    return x, ok


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr,
    key_lo, key_hi, est_pos0, rows, scale, num_tiles,
    stride_qr, stride_qh, stride_kl, stride_kh,
    GROUPS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    slot = tl.program_id(1)
    r = tl.arange(0, ROWS_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + r[:, None] * stride_qr + h * stride_qh + d[None, :], mask=r[:, None] < rows)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full((ROWS_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((ROWS_PAD,), tl.float32)
    for tile in range(slot, num_tiles, SLOTS):
        cols = (key_lo + n).to(tl.int64) + tile * BLOCK_N
        x, ok = _scaled_logits(
            q, k_ptr, cols, h, r, d, key_hi, est_pos0, rows, scale, stride_kl, stride_kh,
            GROUPS, CAUSAL, UPCAST,
        )  # fmt: skip
        x = tl.where(ok, x, float("-inf"))
        new = tl.maximum(m, tl.max(x, 1))
        safe = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
        m = new
    at = (h * SLOTS + slot) * ROWS_PAD + r
    tl.store(m_ptr + at, m)
    tl.store(l_ptr + at, total)


@triton.jit
def _probs_kernel(
    q_ptr, k_ptr, lse_ptr, vert_ptr, buf_ptr,
    h0, key_lo, key_hi, est_pos0, rows, scale, fold, periods, width,
    stride_qr, stride_qh, stride_kl, stride_kh, stride_vh, stride_bg, stride_br,
    GROUPS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)  # head h0 + g of the group
    tile = tl.program_id(1)
    h = h0 + g
    r = tl.arange(0, ROWS_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # key (or folded position) within the part
    q = tl.load(q_ptr + r[:, None] * stride_qr + h * stride_qh + d[None, :], mask=r[:, None] < rows)
    if UPCAST:
        q = q.to(tl.float32)
    lse = tl.load(lse_ptr + h * ROWS_PAD + r)
    acc = tl.zeros((ROWS_PAD, BLOCK_N), tl.float32)
    # A fold part (fold % BLOCK_N == 0) visits its folded tile in every period and sums there.
    for period in range(periods):
        cols = (key_lo + t).to(tl.int64) + period * fold
        x, ok = _scaled_logits(
            q, k_ptr, cols, h, r, d, key_hi, est_pos0, rows, scale, stride_kl, stride_kh,
            GROUPS, CAUSAL, UPCAST,
        )  # fmt: skip
        p = tl.where(ok, tl.exp(x - lse[:, None]), 0.0)
        tl.store(vert_ptr + h * stride_vh + (cols - key_lo), tl.sum(p, 0), mask=cols < key_hi)
        acc += p
    at = buf_ptr + g * stride_bg + r[:, None].to(tl.int64) * stride_br + t[None, :]
    tl.store(at, acc, mask=(r[:, None] < rows) & (t[None, :] < width))


def part_scores_triton(
    q_sel: Tensor,
    keys: Tensor,
    parts: Sequence[SparsePart],
    est_pos0: int,
    *,
    scale: float,
    block_n: int = BLOCK_N,
    max_elements: int = SCORE_ELEMENTS,
) -> tuple[list[Tensor], list[Tensor]]:
    """Same contract as longctx.sparse.estimate.part_scores: q_sel [P, R, Hq, D], keys
    [L, Hkv, D] -> vertical [Hq, part keys] and slash [Hq, R + width - 1] float32 per part."""
    _, rows, hq, d = q_sel.shape
    groups = hq // keys.shape[1]
    rows_pad = max(16, triton.next_power_of_2(rows))
    upcast, _ = dtype_flags(q_sel.dtype)
    dev = q_sel.device
    common = dict(
        GROUPS=groups, HEAD_DIM=d, ROWS_PAD=rows_pad, BLOCK_N=block_n, UPCAST=upcast, num_warps=4
    )
    stats = []
    for i, p in enumerate(parts):
        tiles = triton.cdiv(p.num_keys, block_n)
        slots = min(SLOTS, tiles)
        m = torch.empty((hq, slots, rows_pad), dtype=torch.float32, device=dev)
        sums = torch.empty_like(m)
        q = q_sel[i]
        _row_stats_kernel[(hq, slots)](
            q, keys, m, sums, p.key_lo, p.key_hi, est_pos0, rows, scale, tiles,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
            CAUSAL=p.causal, SLOTS=slots, **common,
        )  # fmt: skip
        stats.append((m, sums))
    top = torch.cat([m for m, _ in stats], 1).amax(1)  # [H, RP]
    safe = torch.where(torch.isinf(top), 0.0, top)
    total = sum((sums * torch.exp(m - safe[:, None])).sum(1) for m, sums in stats)
    lse = (safe + torch.log(total)).contiguous()

    vert = [torch.empty((hq, p.num_keys), dtype=torch.float32, device=dev) for p in parts]
    slash = [
        torch.empty((hq, rows + p.diagonal_width - 1), dtype=torch.float32, device=dev)
        for p in parts
    ]
    widest = max(p.diagonal_width for p in parts)
    step = max(1, min(hq, max_elements // max(1, rows * widest)))
    # A fold part's tiles must not straddle its periods: the largest power of 2 <= block_n
    # dividing every fold.
    bn = block_n
    while any(p.fold % bn for p in parts if p.fold) and bn > 16:
        bn //= 2
    if any(p.fold % bn for p in parts if p.fold):
        return part_scores(q_sel, keys, parts, est_pos0, scale=scale, max_elements=max_elements)
    for h0 in range(0, hq, step):
        g = min(step, hq - h0)
        for i, p in enumerate(parts):
            width = p.diagonal_width
            diag = DiagonalSums(g, rows, width, dev)
            q = q_sel[i]
            _probs_kernel[(g, triton.cdiv(width, bn))](
                q, keys, lse, vert[i], diag.centre,
                h0, p.key_lo, p.key_hi, est_pos0, rows, scale, width, p.num_keys // width, width,
                q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                vert[i].stride(0), diag.centre.stride(0), diag.centre.stride(1),
                CAUSAL=p.causal, **(common | dict(BLOCK_N=bn)),
            )  # fmt: skip
            slash[i][h0 : h0 + g] = diag.sums()
    return vert, slash
