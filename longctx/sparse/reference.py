"""PyTorch versions of the vertical-slash sparse attention.

`sparse_attention_reference`: the same function as the Triton kernel (ops/triton/vs_sparse.py),
from the same SegmentIndex: per query block it gathers the keys of its visible tiles and
columns and runs a masked softmax; parts are merged by log-sum-exp. It is what the sparse
backend runs on the CPU. `index_masks` + `masked_reference`: the float64 ground truth, from an
explicit [rows, keys] mask built from the slash runs and columns. `selection_masks`: the keys
the selected diagonals and columns name exactly (before tiling), for conversion tests.
`dense_lse`: log-sum-exp over every key a row may see (the recall denominator).

Shapes: q_parts [P, n, Hq, D] (part p rotated as its part needs, YaRN factor included);
keys / values [L, Hkv, D], position = row; out [n, Hq, D]; lse [Hq, n] (natural log).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longctx.ops.attention import merge_attention, reference_attention
from longctx.sparse.convert import SegmentIndex
from longctx.sparse.estimate import NO_COLUMN, NO_SLASH, PartSelection, SparsePart

Tensor = torch.Tensor

GATHER_ELEMENTS = 2**24  # gathered key elements per step (x head_dim)


# --- the CPU path -------------------------------------------------------------------------


def sparse_attention_reference(
    q_parts: Tensor, keys: Tensor, values: Tensor, index: SegmentIndex, *, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of each row over its part's tiles and columns, float32 accumulation."""
    parts = [
        _part_attention(q_parts[p], keys, values, index, p, scale) for p in range(len(index.parts))
    ]
    out, lse = merge_attention(parts)
    return out.to(q_parts.dtype), lse


def _part_attention(
    q: Tensor, keys: Tensor, values: Tensor, index: SegmentIndex, p: int, scale: float
) -> tuple[Tensor, Tensor]:
    n, hq, d = q.shape
    bm = index.block_m
    nb = index.num_blocks
    qb = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, nb * bm - n)).view(nb, bm, hq, d)
    m0, m1 = index.block_bounds()
    pos = (m0[:, None] + torch.arange(bm, device=q.device)).clamp(max=index.q_pos0 + n - 1)
    part = index.parts[p]
    row_hi = (
        torch.clamp(pos + 1, max=part.key_hi) if part.causal else torch.full_like(pos, part.key_hi)
    )
    width = _keys_per_block(index, p)
    step = max(1, GATHER_ELEMENTS // max(1, hq * width * d))
    outs, lses = [], []
    for b0 in range(0, nb, step):
        blocks = slice(b0, min(b0 + step, nb))
        key_pos, ok = _block_keys(index, p, blocks)  # [H, nb, K]
        ok &= key_pos >= part.key_lo
        o, s = _gathered_attention(qb[blocks], keys, values, key_pos, ok, row_hi[blocks], scale)
        outs.append(o)
        lses.append(s)
    out = torch.cat(outs).flatten(0, 1)[:n]  # [n, Hq, D]
    lse = torch.cat(lses, dim=1).flatten(1)[:, :n]  # [Hq, n]
    return out, lse


def _keys_per_block(index: SegmentIndex, p: int) -> int:
    tiles = (index.tile_range[p, ..., 1] - index.tile_range[p, ..., 0]).max()
    return int(tiles) * index.block_n + int(index.column_count[p].max())


def _block_keys(index: SegmentIndex, p: int, blocks: slice) -> tuple[Tensor, Tensor]:
    """Key positions [H, nb, K] a block visits (tiles, then columns) and which are real."""
    bn = index.block_n
    rng = index.tile_range[p, :, blocks].long()  # [H, nb, 2]
    m0 = index.block_bounds()[0][blocks]
    ntiles = int((rng[..., 1] - rng[..., 0]).max()) if rng.numel() else 0
    k = rng[..., :1] + torch.arange(ntiles, device=rng.device)  # [H, nb, T]
    tile_ok = k < rng[..., 1:]
    kc = k.clamp(max=max(index.tile_o.shape[-1] - 1, 0)).flatten(1)
    o = index.tile_o[p].long().gather(1, kc).view(k.shape) if ntiles else k
    e = index.tile_e[p].long().gather(1, kc).view(k.shape) if ntiles else k
    start = m0[None, :, None] - o
    end = torch.minimum(start + bn, m0[None, :, None] + index.block_m - e)
    key = start[..., None] + torch.arange(bn, device=rng.device)  # [H, nb, T, BN]
    key_ok = tile_ok[..., None] & (key < end[..., None])
    cnt = index.column_count[p, :, blocks].long()
    cols = index.columns[p, :, blocks].long()
    col_ok = torch.arange(cols.shape[-1], device=cols.device) < cnt[..., None]
    key_pos = torch.cat([key.flatten(2), cols], dim=-1)
    ok = torch.cat([key_ok.flatten(2), col_ok], dim=-1)
    return key_pos, ok


def _gathered_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    key_pos: Tensor,
    ok: Tensor,
    row_hi: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """q [nb, BM, Hq, D], key_pos/ok [Hq, nb, K], row_hi [nb, BM] -> out [nb, BM, Hq, D],
    lse [Hq, nb, BM]."""
    hq = q.shape[2]
    kv = (torch.arange(hq, device=q.device) // (hq // keys.shape[1]))[:, None, None]
    idx = key_pos.clamp(0, keys.shape[0] - 1)
    kg, vg = keys[idx, kv].float(), values[idx, kv].float()  # [Hq, nb, K, D]
    s = torch.einsum("bmhd,hbkd->hbmk", q.float(), kg) * scale
    seen = ok[:, :, None, :] & (key_pos[:, :, None, :] < row_hi[None, :, :, None])
    s = s.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, nb, BM]
    probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hbmk,hbkd->bmhd", probs, vg)
    return out, lse


# --- float64 ground truth -------------------------------------------------------------------


def index_masks(index: SegmentIndex, num_keys: int) -> Tensor:
    """[P, H, n, L] bool: key j is attended by row i in part p, from the runs and columns."""
    device = index.run_hi.device
    n = index.num_rows
    m0 = index.block_bounds()[0]
    block = torch.arange(n, device=device) // index.block_m
    pos = index.q_pos0 + torch.arange(n, device=device)
    j = torch.arange(num_keys, device=device)
    masks = []
    for p, part in enumerate(index.parts):
        start = m0[None, :, None] - index.run_hi[p][:, None, :]  # [H, NB, G]
        end = m0[None, :, None] + index.block_m - index.run_lo[p][:, None, :]
        in_run = ((j >= start[..., None]) & (j < end[..., None])).any(2)  # [H, NB, L]
        cols = torch.zeros_like(in_run)
        width = index.columns.shape[-1]
        used = torch.arange(width, device=device) < index.column_count[p][..., None]
        hit = torch.zeros((*in_run.shape[:2], num_keys + 1), dtype=torch.bool, device=device)
        slot = torch.where(used, index.columns[p].long().clamp(0, num_keys - 1), num_keys)
        hit.scatter_(2, slot, True)
        cols |= hit[..., :num_keys]
        chosen = (in_run | cols)[:, block]  # [H, n, L]
        hi = (
            torch.clamp(pos + 1, max=part.key_hi)
            if part.causal
            else torch.full_like(pos, part.key_hi)
        )
        allowed = (j[None, :] >= part.key_lo) & (j[None, :] < hi[:, None])
        masks.append(chosen & allowed[None])
    return torch.stack(masks)


def masked_reference(
    q_parts: Tensor, keys: Tensor, values: Tensor, masks: Tensor, *, scale: float
) -> tuple[Tensor, Tensor]:
    """float64 attention of part p's queries over masks[p] [H, n, L], merged over parts."""
    parts = [
        reference_attention(q_parts[p], keys, values, scale=scale, mask=masks[p])
        for p in range(q_parts.shape[0])
    ]
    return merge_attention(parts)


def selection_masks(
    selections: Sequence[PartSelection],
    parts: Sequence[SparsePart],
    q_pos0: int,
    num_rows: int,
    num_keys: int,
) -> Tensor:
    """[P, H, n, L] bool, by explicit loops: row at p sees key j of a part when p - j is a
    selected diagonal (after the part's shifts) or j a selected column, inside the part."""
    heads = selections[0].vertical.shape[0]
    out = torch.zeros((len(parts), heads, num_rows, num_keys), dtype=torch.bool)
    for pi, (sel, part) in enumerate(zip(selections, parts, strict=True)):
        for h in range(heads):
            cols = {int(c) for c in sel.vertical[h] if int(c) != NO_COLUMN}
            dists = {int(d) + s for d in sel.slash[h] if int(d) != NO_SLASH for s in part.shifts()}
            for i in range(num_rows):
                p = q_pos0 + i
                hi = min(part.key_hi, p + 1) if part.causal else part.key_hi
                for j in range(part.key_lo, hi):
                    out[pi, h, i, j] = j in cols or (p - j) in dists
    return out


# --- recall ----------------------------------------------------------------------------------


def dense_lse(
    q_rows: Tensor,
    keys: Tensor,
    parts: Sequence[SparsePart],
    positions: Tensor,
    *,
    scale: float,
    key_chunk: int = 65536,
) -> Tensor:
    """log-sum-exp [Hq, r] over all keys each row may see: q_rows [P, r, Hq, D] at absolute
    positions [r], part p's queries scored against its keys (causal where it is)."""
    hq = q_rows.shape[2]
    kv = torch.arange(hq, device=q_rows.device) // (hq // keys.shape[1])
    pieces = []
    for p, part in enumerate(parts):
        q = q_rows[p].float().transpose(0, 1)  # [Hq, r, D]
        for a in range(part.key_lo, part.key_hi, key_chunk):
            b = min(a + key_chunk, part.key_hi)
            k = keys[a:b, kv].float().transpose(0, 1)  # [Hq, l, D]
            s = q @ k.transpose(1, 2) * scale
            if part.causal:
                j = torch.arange(a, b, device=q.device)
                s = s.masked_fill(j[None, None, :] > positions[None, :, None], float("-inf"))
            pieces.append(s.logsumexp(-1))
    return torch.stack(pieces).logsumexp(0)


def full_selection(
    parts: Sequence[SparsePart], heads: int, q_end: int, device: torch.device
) -> list[PartSelection]:
    """Selections naming every key of every part for queries before q_end: all columns and a
    distance range wide enough for any query (sparse then equals dense)."""
    out = []
    for part in parts:
        cols = torch.arange(part.key_lo, part.key_hi, device=device)
        reach = q_end + abs(part.q_shift) + 1
        dists = torch.arange(-reach, reach + 1, device=device)
        out.append(PartSelection(cols.expand(heads, -1), dists.expand(heads, -1)))
    return out
