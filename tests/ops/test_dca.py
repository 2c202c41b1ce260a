"""DCA position maths, the YaRN factor, the float64 reference itself, and merging empty parts."""

import math

import pytest
import torch

from longctx.config import DCAConfig
from longctx.layers.rotary import RotaryEmbedding
from longctx.ops.attention import (
    attention_with_lse,
    empty_attention,
    merge_attention,
    reference_attention,
)
from longctx.ops.dca import (
    INTER,
    INTRA,
    SUCCESSIVE,
    dca_segments,
    key_parts,
    key_positions,
    query_positions,
    reference_dca_attention,
    reference_distances,
    yarn_factor,
    yarn_scale,
)

DIAGRAM = DCAConfig(chunk_size=6, local_size=2, original_max_position_embeddings=10**6)
CONFIGS = [
    DCAConfig(16, 4, 10**6),  # c = 12, successive clamps at C
    DCAConfig(16, 10, 10**6),  # c = 6 < W: inter position 2c - 1 < C
    DCAConfig(30, 6, 10**6),  # c = 24
]


def test_positions_of_the_docstring_diagram():
    q = query_positions(torch.tensor([13, 3, 0]), DIAGRAM)
    assert q[:, 0].tolist() == [1, 5, 6]  # p = 13: intra 13 mod 4, successive 1 + 4, inter 6
    assert q[:, 1].tolist() == [3, 6, 6]  # successive 3 + 4 clamped at C = 6
    assert key_positions(torch.arange(14), DIAGRAM).tolist() == [0, 1, 2, 3] * 3 + [0, 1]
    dist = reference_distances(torch.tensor([13]), torch.arange(14), DIAGRAM)[0]
    assert dist.tolist() == [6, 5, 4, 3, 6, 5, 4, 3, 5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("dca", CONFIGS)
def test_backend_tables_give_the_reference_distances(dca):
    p = torch.arange(80)
    parts = key_parts(p[:, None], p[None, :], dca.chunk_len)  # [query, key]
    qpos = query_positions(p, dca)[parts, p[:, None]]
    dist = qpos - key_positions(p, dca)[None, :]
    causal = p[None, :] <= p[:, None]
    assert torch.equal(dist[causal], reference_distances(p, p, dca)[causal])


@pytest.mark.parametrize("dca", CONFIGS)
def test_distances_are_bounded_and_true_where_they_should_be(dca):
    c, big_c = dca.chunk_len, dca.chunk_size
    p = torch.arange(100)
    dist = reference_distances(p, p, dca)
    true = p[:, None] - p[None, :]
    rel = p[:, None] // c - p[None, :] // c
    causal = true >= 0
    assert dist[causal].min() >= 0 and dist[causal].max() <= big_c
    assert torch.equal(dist[rel == 0], true[rel == 0])
    near = (rel == 1) & (p[:, None] % c + c <= big_c)  # successive, not clamped
    assert torch.equal(dist[near], true[near])


def test_key_parts():
    parts = key_parts(torch.tensor([[30]]), torch.arange(31)[None, :], 12)[0]
    assert parts[:12].eq(INTER).all() and parts[12:24].eq(SUCCESSIVE).all()
    assert parts[24:].eq(INTRA).all()


def test_segments_of_a_straddling_prefill_chunk():
    segs = dca_segments(5, 40, 12)
    assert [(s.chunk, s.q_start, s.q_end) for s in segs] == [
        (0, 5, 12),
        (1, 12, 24),
        (2, 24, 36),
        (3, 36, 40),
    ]
    assert (segs[3].intra, segs[3].successive, segs[3].inter) == ((36, 40), (24, 36), (0, 24))
    assert (segs[0].intra, segs[0].successive, segs[0].inter) == ((0, 12), (0, 0), (0, 0))
    assert segs[1].successive == (0, 12) and segs[1].inter == (0, 0)
    assert dca_segments(7, 7, 12) == []


def test_yarn_scale_at_known_points():
    assert yarn_scale(0.25) == 1.0 and yarn_scale(1.0) == 1.0
    assert yarn_scale(math.e**2) == pytest.approx(1.2, abs=1e-12)
    assert yarn_scale(math.e**-3) == 1.0


def test_yarn_factor_per_token():
    original = 1000
    p = torch.tensor([0, 998, 999, 1000, 7388, 50_000])  # (p + 1) / original = ..., 7.389 ~ e^2
    f = yarn_factor(p, original)
    assert f[:3].eq(1.0).all()  # p + 1 <= original
    assert f[3] > 1.0
    assert f[4].item() == pytest.approx(1.2, abs=1e-4)
    expected = [yarn_scale((x + 1) / original) for x in p.tolist()]
    torch.testing.assert_close(f, torch.tensor(expected, dtype=torch.float32))


def _qkv(lq, lk, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(lq, hq, d, generator=g),
        torch.randn(lk, hkv, d, generator=g),
        torch.randn(lk, hkv, d, generator=g),
    )


def test_merge_with_empty_parts_equals_attention_over_the_union():
    q, k, v = _qkv(7, 20)
    whole = attention_with_lse(q, k, v, scale=0.3, causal=False)
    parts = [
        attention_with_lse(q, k[:8], v[:8], scale=0.3, causal=False),
        empty_attention(q),
        attention_with_lse(q, k[8:], v[8:], scale=0.3, causal=False),
    ]
    out, lse = merge_attention(parts)
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-5)
    alone, alone_lse = merge_attention([empty_attention(q), parts[0]])
    torch.testing.assert_close(alone, parts[0][0])
    torch.testing.assert_close(alone_lse, parts[0][1])


def test_merge_of_only_empty_parts_is_zero_with_minus_inf():
    q, _, _ = _qkv(3, 1)
    out, lse = merge_attention([empty_attention(q), empty_attention(q)])
    assert out.eq(0).all() and torch.isneginf(lse).all()


def test_reference_without_dca_is_rope_causal_attention():
    q, k, v = _qkv(9, 25)
    rope = RotaryEmbedding(16, 500.0)
    qr = rope.apply(q.double(), torch.arange(16, 25)).double()
    kr = rope.apply(k.double(), torch.arange(25)).double()
    mask = torch.arange(25)[None, :] <= torch.arange(16, 25)[:, None]
    want, want_lse = reference_attention(qr, kr, v, scale=0.25, mask=mask)
    got, lse = reference_dca_attention(
        q, k, v, first_position=16, dca=None, rope_theta=500.0, scale=0.25
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # rope tables are float32
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [30, 40])
def test_reference_with_chunk_covering_the_sequence_is_plain_attention(length):
    dca = DCAConfig(chunk_size=40, local_size=12, original_max_position_embeddings=64)
    q, k, v = _qkv(length, length)
    kw = dict(first_position=0, rope_theta=500.0, scale=0.25)
    got = reference_dca_attention(q, k, v, dca=dca, **kw)
    want = reference_dca_attention(q, k, v, dca=None, **kw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_reference_applies_yarn_per_query_token():
    dca = DCAConfig(chunk_size=40, local_size=12, original_max_position_embeddings=10)
    q, k, v = _qkv(30, 30)
    kw = dict(first_position=0, rope_theta=500.0)
    scaled = reference_dca_attention(q, k, v, dca=dca, scale=0.25, **kw)[0]
    for p in (5, 9, 20, 29):  # f(p)^2 multiplies the logits: the same as a larger scale
        f = yarn_scale((p + 1) / 10)
        plain = reference_dca_attention(q, k, v, dca=None, scale=0.25 * f * f, **kw)[0]
        torch.testing.assert_close(scaled[p], plain[p], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(
        scaled[20], reference_dca_attention(q, k, v, dca=None, scale=0.25, **kw)[0][20]
    )
