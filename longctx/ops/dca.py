"""Dual Chunk Attention (DCA) position maths, the YaRN attention factor, and a float64 reference.

C = chunk_size, W = local_size, c = C - W (chunk_len). A token at absolute position p lies in DCA
chunk p // c. Keys are rotated once, at p mod c. A query is rotated three ways and each key is
scored with the variant chosen by the chunk relation between key and query:

    C = 6, W = 2, c = 4; query at p = 13 (chunk 3, p mod c = 1)

    key j       0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12 13
    chunk       0       | 1       | 2         | 3
    key pos     0 1 2 3 | 0 1 2 3 | 0 1 2  3  | 0  1      (j mod c)
    part        inter   | inter   | successive| intra
    query pos   6 (min(2c-1, C), a constant)  | 5 (min(p mod c + c, C)) | 1 (p mod c)
    distance    6 5 4 3 | 6 5 4 3 | 5 4 3  2  | 1  0      (query pos - key pos)

Intra is causal (same chunk, j <= p); successive and inter see their whole key ranges. Distances
are the true ones inside the chunk and in the local window of the previous chunk, and never exceed
C, so the model never sees a distance longer than it was trained on. With length <= C and
W < C / 2 (so length <= 2c and there is no inter part) DCA is exactly ordinary causal attention.

YaRN attention scaling, our decision: the KV cache stays unscaled; the query of the token at
absolute position p has its logits multiplied by f(p)^2 with

    f(p) = max(1, 0.1 ln((p + 1) / original_max_position_embeddings) + 1).

A per-token s = (p + 1) / original (rather than one s per request or per forward call) makes a
token's output independent of how the prompt was chunked, and makes decoding token t equal the
last row of a prefill of t tokens. f = 1 while p + 1 <= original, so short inputs are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longctx.config import DCAConfig

Tensor = torch.Tensor

INTRA, SUCCESSIVE, INTER = 0, 1, 2  # index of each query variant ("part")


def key_positions(positions: Tensor, dca: DCAConfig) -> Tensor:
    """RoPE positions of keys at absolute positions [T]: p mod c."""
    return positions % dca.chunk_len


def query_positions(positions: Tensor, dca: DCAConfig) -> Tensor:
    """RoPE positions [3, T] (intra, successive, inter) of queries at absolute positions [T]."""
    c, big_c = dca.chunk_len, dca.chunk_size
    intra = positions % c
    successive = (intra + c).clamp(max=big_c)
    inter = torch.full_like(positions, min(2 * c - 1, big_c))
    return torch.stack([intra, successive, inter])


def key_parts(query_pos: Tensor, key_pos: Tensor, chunk_len: int) -> Tensor:
    """Which query variant scores each key: INTRA / SUCCESSIVE / INTER, broadcast shape.

    Keys after the query (only possible for padding or the causal mask) come out INTRA.
    """
    return (query_pos // chunk_len - key_pos // chunk_len).clamp(INTRA, INTER)


def yarn_scale(s: float) -> float:
    """YaRN attention factor f for a length ratio s (f = 1 for s <= 1)."""
    return max(1.0, 0.1 * math.log(s) + 1.0) if s > 0 else 1.0


def yarn_factor(positions: Tensor, original: int) -> Tensor:
    """f(p) [T] float32 for queries at absolute positions [T], with s = (p + 1) / original."""
    s = (positions.to(torch.float64) + 1.0) / original
    return (0.1 * s.log() + 1.0).clamp(min=1.0).to(torch.float32)


@dataclass(frozen=True)
class DCASegment:
    """The queries [q_start, q_end) of one prefill chunk that lie in DCA chunk `chunk`.

    Key ranges are absolute [start, end): intra is bottom-right causal (the queries are the last
    tokens of it); successive and inter are non-causal and may be empty.
    """

    chunk: int
    q_start: int
    q_end: int
    chunk_len: int

    @property
    def intra(self) -> tuple[int, int]:
        return self.chunk * self.chunk_len, self.q_end

    @property
    def successive(self) -> tuple[int, int]:
        start = self.chunk * self.chunk_len
        return max(0, start - self.chunk_len), start

    @property
    def inter(self) -> tuple[int, int]:
        return 0, max(0, (self.chunk - 1) * self.chunk_len)


def dca_segments(start: int, end: int, chunk_len: int) -> list[DCASegment]:
    """Split queries at absolute positions [start, end) by DCA chunk (a prefill chunk can
    straddle several)."""
    if end <= start:
        return []
    return [
        DCASegment(j, max(start, j * chunk_len), min(end, (j + 1) * chunk_len), chunk_len)
        for j in range(start // chunk_len, (end - 1) // chunk_len + 1)
    ]


def biased_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention with an additive bias, head-major: q [B, H, R, D], k/v [B, H, L, D],
    bias [B, 1 or H, R, L] in q's dtype -> (out [B, H, R, D], lse [B, H, R] float32).

    Fused kernels (memory-efficient on CUDA, flash on the CPU) keep the scores in float32 and
    read each key once for all R query rows. Mask with a large finite negative bias, not -inf:
    a row with no key then gets a huge negative lse (weight 0 in a merge) instead of NaN.
    """
    if q.device.type == "cuda":
        bias = bias.expand(q.shape[0], q.shape[1], *bias.shape[2:])  # it wants every head
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale
        )
        return res[0], res[1][..., : q.shape[2]].float()
    res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    return res[0], res[1].float()


# --- float64 brute-force reference -----------------------------------------------------------


def reference_distances(query_pos: Tensor, key_pos: Tensor, dca: DCAConfig) -> Tensor:
    """[Lq, Lk] RoPE distance (query position - key position) DCA gives each (query, key) pair.

    Written elementwise from the definitions, independently of `query_positions`, so the
    backend's position tables are tested against it.
    """
    c, big_c = dca.chunk_len, dca.chunk_size
    p, j = query_pos[:, None], key_pos[None, :]
    rel = p // c - j // c
    q_intra, q_succ = p % c, torch.clamp(p % c + c, max=big_c)
    q_inter = torch.full_like(p, min(2 * c - 1, big_c))
    q = torch.where(rel == 0, q_intra, torch.where(rel == 1, q_succ, q_inter))
    return q - j % c


def reference_dca_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    first_position: int,
    dca: DCAConfig | None,
    rope_theta: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Causal DCA + YaRN attention in float64, from the full (query, key) distance matrix.

    q [Lq, Hq, D] unrotated, at absolute positions first_position + i; k/v [Lk, Hkv, D] unrotated,
    at positions 0..Lk-1 (Lk = first_position + Lq). dca=None gives plain RoPE causal attention
    (distance p - j). Returns (out [Lq, Hq, D] float64, lse [Hq, Lq] float64).
    """
    qp = torch.arange(first_position, first_position + q.shape[0])
    kp = torch.arange(k.shape[0])
    dist = qp[:, None] - kp[None, :] if dca is None else reference_distances(qp, kp, dca)
    s = _rope_scores(q, k, dist, rope_theta) * scale
    if dca is not None:
        f = torch.tensor(
            [yarn_scale((p + 1) / dca.original_max_position_embeddings) for p in qp.tolist()],
            dtype=torch.float64,
        )
        s = s * f.square()[None, :, None]
    s = s.masked_fill(kp[None, None, :] > qp[None, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Lq]
    vd = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1).transpose(0, 1)
    return (torch.softmax(s, dim=-1) @ vd).transpose(0, 1), lse


def _rope_scores(q: Tensor, k: Tensor, dist: Tensor, theta: float) -> Tensor:
    """[H, Lq, Lk] dot products of q rotated at a and k rotated at b, for a - b = dist.

    Rotate-half RoPE: rot(q, a) . rot(k, b) = sum_m (q1 k1 + q2 k2) cos(d w_m)
    + (q1 k2 - q2 k1) sin(d w_m), with d = a - b and w_m = theta^(-2m/D).
    """
    half = q.shape[-1] // 2
    qd = q.double().transpose(0, 1)  # [H, Lq, D]
    kd = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(0, 1)
    q1, q2, k1, k2 = qd[..., :half], qd[..., half:], kd[..., :half], kd[..., half:]
    a = torch.einsum("hqm,hkm->hqkm", q1, k1) + torch.einsum("hqm,hkm->hqkm", q2, k2)
    b = torch.einsum("hqm,hkm->hqkm", q1, k2) - torch.einsum("hqm,hkm->hqkm", q2, k1)
    w = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / q.shape[-1])
    angle = dist.double()[..., None] * w  # [Lq, Lk, D/2]
    return (a * angle.cos() + b * angle.sin()).sum(-1)
