"""The DCA backend through BatchLayout / metadata and a real paged cache, against the float64
brute-force reference, under schedules where prefill chunks, DCA chunks and KV blocks cut each
other; ragged GQA batches mixing sequences shorter and longer than one DCA chunk."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from longctx.config import DCAConfig, ModelConfig
from longctx.errors import ConfigError
from longctx.layers.attention import dca_backend
from longctx.layers.attention.backend import AttentionBackend, BatchLayout, KVCache
from longctx.layers.attention.dca_backend import DCAAttentionBackend
from longctx.layers.attention.registry import make_backend
from longctx.layers.attention.torch_backend import TorchAttentionBackend
from longctx.ops.dca import reference_dca_attention

HQ, HKV, D, THETA = 4, 2, 16, 500.0
TOL = dict(atol=2e-5, rtol=2e-5)


def model_config(dca: DCAConfig | None) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2",
        vocab_size=32,
        hidden_size=HQ * D,
        intermediate_size=32,
        num_layers=1,
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        rms_norm_eps=1e-6,
        rope_theta=THETA,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
        dca=dca,
    )


@dataclass
class Seq:
    prompt: int
    q: torch.Tensor  # [N, HQ, D] unrotated, N = prompt + decode steps
    k: torch.Tensor  # [N, HKV, D]
    v: torch.Tensor
    blocks: tuple[int, ...]
    done: int = 0

    @property
    def total(self) -> int:
        return self.q.shape[0]

    def next_len(self, chunk: int) -> int:
        if self.done >= self.total:
            return 0
        return min(chunk, self.prompt - self.done) if self.done < self.prompt else 1


def make_seqs(lengths: list[tuple[int, int]], block_size: int, seed: int = 0) -> list[Seq]:
    """(prompt, decode) per sequence; block tables drawn shuffled from a pool with holes."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(p + n) // block_size) for p, n in lengths]
    pool = torch.randperm(sum(need) * 2, generator=g).tolist()  # half the blocks stay unused
    seqs = []
    for (p, n), nb in zip(lengths, need, strict=True):
        q, k, v = (torch.randn(p + n, h, D, generator=g) for h in (HQ, HKV, HKV))
        seqs.append(Seq(p, q, k, v, tuple(pool[:nb])))
        pool = pool[nb:]
    return seqs


def run_schedule(
    backend: AttentionBackend, seqs: list[Seq], chunk: int, block_size: int, num_blocks: int
) -> tuple[list[torch.Tensor], int]:
    """Prefill each prompt `chunk` tokens per step, then decode one token per step.

    Returns every sequence's outputs [N, HQ, D] and the number of decode-only steps.
    """
    g = torch.Generator().manual_seed(1)
    cache = KVCache(
        torch.randn(num_blocks, block_size, HKV, D, generator=g),  # garbage, not 0
        torch.randn(num_blocks, block_size, HKV, D, generator=g),
    )
    outs = [torch.full_like(s.q, float("nan")) for s in seqs]
    decode_steps = 0
    while any(s.done < s.total for s in seqs):
        step = [
            (s, o, s.next_len(chunk)) for s, o in zip(seqs, outs, strict=True) if s.next_len(chunk)
        ]
        layout = BatchLayout(
            tuple(n for _, _, n in step),
            tuple(s.done + n for s, _, n in step),
            tuple(s.blocks[: -(-(s.done + n) // block_size)] for s, _, n in step),
            block_size,
        )
        decode_steps += layout.is_decode_only
        meta = backend.prepare(layout, torch.device("cpu"))
        cat = [torch.cat([getattr(s, x)[s.done : s.done + n] for s, _, n in step]) for x in "qkv"]
        out = backend.forward(*cat, cache, meta)
        for i, (s, o, n) in enumerate(step):
            o[s.done : s.done + n] = out[meta.query_starts[i] : meta.query_starts[i + 1]]
            s.done += n
    return outs, decode_steps


def reference(seq: Seq, dca: DCAConfig) -> torch.Tensor:
    return reference_dca_attention(
        seq.q, seq.k, seq.v, first_position=0, dca=dca, rope_theta=THETA, scale=D**-0.5
    )[0]


def run(
    dca: DCAConfig,
    lengths: list[tuple[int, int]],
    chunk: int,
    block_size: int,
    backend_cls: type[AttentionBackend] = DCAAttentionBackend,
):
    seqs = make_seqs(lengths, block_size)
    num_blocks = max(b for s in seqs for b in s.blocks) + 3
    outs, decode_steps = run_schedule(
        backend_cls(model_config(dca)), seqs, chunk, block_size, num_blocks
    )
    return seqs, outs, decode_steps


RAGGED = [(70, 6), (9, 4), (30, 8), (1, 3), (25, 5)]  # short (< c) and long sequences, GQA


# Every DCA config meets every prefill chunk size, block sizes alternating.
@pytest.mark.parametrize(
    "chunk_size,local_size,block_size,chunk",
    [
        (c, w, 4 if (k + n) % 2 else 8, ch)
        for k, (c, w) in enumerate([(16, 4), (30, 6), (16, 10)])
        for n, ch in enumerate([5, 13, 40])
    ],
)
def test_matches_reference_ragged_batch(chunk_size, local_size, block_size, chunk):
    dca = DCAConfig(chunk_size, local_size, original_max_position_embeddings=20)  # YaRN on
    seqs, outs, decode_steps = run(dca, RAGGED, chunk, block_size)
    assert decode_steps > 0  # the batched decode path ran too
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, dca), **TOL)


@pytest.mark.parametrize("split", [16, 32])
def test_decode_with_keys_cut_into_splits(monkeypatch, split):
    monkeypatch.setattr(dca_backend, "DECODE_SPLIT", split)  # 80-token contexts: up to 5 splits
    dca = DCAConfig(16, 4, original_max_position_embeddings=20)
    seqs, outs, decode_steps = run(dca, RAGGED, 13, 4)
    assert decode_steps > 0
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, dca), **TOL)


@pytest.mark.parametrize("original", [20, 1000])
def test_decode_token_equals_last_row_of_prefill(original):
    dca = DCAConfig(16, 4, original)
    _, one_shot, _ = run(dca, [(60, 0)], 60, 4)  # a prefill of all 60 tokens
    _, decoded, steps = run(dca, [(10, 50)], 7, 4)  # 10 prefilled, 50 decoded one by one
    assert steps == 50
    torch.testing.assert_close(decoded[0], one_shot[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunk_covering_every_sequence_equals_torch_backend(chunk):
    dca = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)
    lengths = [(40, 8), (9, 4), (50, 14)]  # up to 64 = C tokens; 48 <= p < 64 use successive
    _, got, _ = run(dca, lengths, chunk, 8)
    _, want, _ = run(dca, lengths, chunk, 8, backend_cls=TorchAttentionBackend)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_registry_picks_dca_when_configured():
    dca = DCAConfig(16, 4, 20)
    assert isinstance(make_backend("auto", model_config(dca), "cpu"), DCAAttentionBackend)
    assert isinstance(make_backend("auto", model_config(None), "cpu"), TorchAttentionBackend)
    with pytest.raises(ConfigError, match="DCA config"):
        make_backend("dca", model_config(None), "cpu")
