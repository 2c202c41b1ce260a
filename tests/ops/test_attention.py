"""attention_with_lse / merge_attention against the float64 brute-force reference."""

import pytest
import torch

from longctx.ops.attention import attention_with_lse, merge_attention, reference_attention
from tests.conftest import device_under_test

DEV = device_under_test()


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def bottom_right_causal(lq: int, lk: int) -> torch.Tensor:
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return j <= i + (lk - lq)


DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEV.type == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lq,lk,causal",
    [(1, 1, True), (17, 17, True), (5, 40, True), (64, 64, False), (3, 130, False), (33, 97, True)],
)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (7, 1, 64), (4, 4, 128)])
def test_attention_with_lse_matches_reference(dtype, lq, lk, causal, hq, hkv, d):
    q, k, v = (
        rand(lq, hq, d, dtype=dtype),
        rand(lk, hkv, d, dtype=dtype),
        rand(lk, hkv, d, dtype=dtype),
    )
    scale = d**-0.5
    out, lse = attention_with_lse(q, k, v, scale=scale, causal=causal)
    mask = bottom_right_causal(lq, lk).to(DEV) if causal else None
    ref_out, ref_lse = reference_attention(q, k, v, scale=scale, mask=mask)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.shape == q.shape and lse.shape == (hq, lq)
    assert (out.double() - ref_out).abs().max() < tol
    assert (lse.double() - ref_lse).abs().max() < tol


def test_no_keys_gives_zero_output_and_minus_inf_lse():
    q = rand(3, 4, 16)
    out, lse = attention_with_lse(q, rand(0, 2, 16), rand(0, 2, 16), scale=0.25, causal=False)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isinf(lse).all() and (lse < 0).all()


def test_merge_of_disjoint_key_sets_equals_whole_with_empty_parts():
    q, k, v = rand(6, 4, 16), rand(50, 2, 16), rand(50, 2, 16)
    whole = reference_attention(q, k, v, scale=0.25)
    parts = [
        attention_with_lse(q, k[a:b], v[a:b], scale=0.25, causal=False)
        for a, b in [(0, 0), (0, 20), (20, 20), (20, 50)]
    ]
    out, lse = merge_attention(parts)
    assert (out.double() - whole[0]).abs().max() < 1e-5
    assert (lse.double() - whole[1]).abs().max() < 1e-5


def test_merge_of_only_empty_parts():
    q = rand(2, 4, 16)
    empty = attention_with_lse(q, rand(0, 2, 16), rand(0, 2, 16), scale=0.25, causal=False)
    out, lse = merge_attention([empty, empty])
    assert torch.equal(out, torch.zeros_like(q)) and torch.isinf(lse).all()
