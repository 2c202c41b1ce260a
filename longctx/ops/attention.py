"""Attention with log-sum-exp: the plain-PyTorch building block of every attention backend.

Shapes are token-major, as the engine stores them: q [Lq, Hq, D], k/v [Lk, Hkv, D] with Hq a
multiple of Hkv (GQA). Every function returns (out [Lq, Hq, D], lse [Hq, Lq] float32, natural log)
so partial attentions over disjoint key sets can be merged exactly (`merge_attention`).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def empty_attention(q: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over no keys: zero output, lse = -inf (weight 0 in a merge)."""
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device, dtype=torch.float32)
    return torch.zeros_like(q), lse


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """Softmax attention of q over k/v.

    causal is bottom-right aligned: query i (of Lq) sees keys j <= i + (Lk - Lq), i.e. the
    queries are the last Lq tokens of the key sequence.
    """
    lq, lk = q.shape[0], k.shape[0]
    if lq == 0:
        return q.new_empty(q.shape), q.new_empty((q.shape[1], 0), dtype=torch.float32)
    if lk == 0:
        return empty_attention(q)
    if causal and lk != lq:
        if lk < lq:
            raise ValueError(
                f"causal attention needs at least as many keys ({lk}) as queries ({lq})"
            )
        p = lk - lq
        prefix = attention_with_lse(q, k[:p], v[:p], scale=scale, causal=False)
        self_part = attention_with_lse(q, k[p:], v[p:], scale=scale, causal=True)
        return merge_attention([prefix, self_part])
    return _sdpa_with_lse(q, k, v, scale=scale, causal=causal)


def _sdpa_with_lse(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, L, D]
    if q.device.type == "cuda":
        out, lse = _cuda_sdpa_with_lse(qh, kh, vh, scale=scale, causal=causal)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kh, vh, 0.0, causal, scale=scale
        )
    return out[0].transpose(0, 1), lse[0].float()


def _cuda_sdpa_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # The LSE-returning CUDA entry points take equal head counts.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if q.dtype in (torch.float16, torch.bfloat16):
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale
            )
            return res[0], res[1].reshape(q.shape[0], q.shape[1], q.shape[2])
        except RuntimeError:
            pass
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return res[0], res[1]
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return res[0], res[1][..., : q.shape[2]]


def merge_attention(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine attentions over disjoint key sets: out = sum_k w_k out_k, w_k ~ exp(lse_k).

    Parts with lse = -inf (no keys) get weight 0; if every part is empty the result is
    zero output with lse = -inf.
    """
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # [P, H, L]
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - safe)  # exp(-inf) = 0 for empty parts
    out = sum(o.float() * w.transpose(0, 1).unsqueeze(-1) for (o, _), w in zip(parts, weights))
    return out.to(parts[0][0].dtype), lse


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Brute-force float64 attention with an explicit boolean mask [Lq, Lk] (True = attend).

    The ground truth the fast paths are tested against; also the place to build DCA or sparse
    masks explicitly.
    """
    groups = q.shape[1] // k.shape[1]
    qd = q.double().transpose(0, 1)  # [H, Lq, D]
    kd = k.double().repeat_interleave(groups, dim=1).transpose(0, 1)
    vd = v.double().repeat_interleave(groups, dim=1).transpose(0, 1)
    s = qd @ kd.transpose(1, 2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Lq]
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return (p @ vd).transpose(0, 1), lse
