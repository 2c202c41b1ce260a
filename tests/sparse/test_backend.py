"""The sparse backend through BatchLayout and a real paged cache: with budgets that name every
key it equals the float64 DCA / causal references (chunked prefill, ragged GQA batches, decode
and mixed steps); with small budgets it is sparse and its recall is recorded; short chunks and
decode go to the dense backend; the registry wiring."""

from __future__ import annotations

import pytest
import torch

from longctx.config import DCAConfig
from longctx.layers.attention.backend import BatchLayout, KVCache
from longctx.layers.attention.dca_backend import DCAAttentionBackend
from longctx.layers.attention.registry import make_backend
from longctx.layers.attention.sparse_backend import SparseAttentionBackend
from longctx.layers.attention.torch_backend import TorchAttentionBackend
from longctx.ops.dca import reference_dca_attention
from longctx.sparse.config import SparseConfig
from tests.layers.test_dca_backend import (
    RAGGED,
    THETA,
    TOL,
    D,
    make_seqs,
    model_config,
    run_schedule,
)

FULL = SparseConfig(default_vertical=10**6, default_slash=10**6, threshold=0, last_q=8)


class Recall:
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def record(self, layer: int, recall: torch.Tensor) -> None:
        assert layer == 0
        self.values.append(recall)


def sparse_backend(dca, sparse=FULL, recorder=None, use_kernel=None) -> SparseAttentionBackend:
    config = model_config(dca)
    dense = make_backend("auto", config, "cpu")
    return SparseAttentionBackend(config, sparse, dense, recorder, use_kernel)


def run(backend, lengths, chunk, block_size):
    seqs = make_seqs(lengths, block_size)
    num_blocks = max(b for s in seqs for b in s.blocks) + 3
    outs, decode_steps = run_schedule(backend, seqs, chunk, block_size, num_blocks)
    return seqs, outs, decode_steps


def reference(seq, dca):
    return reference_dca_attention(
        seq.q, seq.k, seq.v, first_position=0, dca=dca, rope_theta=THETA, scale=D**-0.5
    )[0]


@pytest.mark.parametrize(
    "dca,chunk,block_size",
    [
        (DCAConfig(16, 4, 20), 5, 4),  # YaRN on, three parts, chunks cut DCA chunks
        (DCAConfig(30, 6, 20), 13, 8),
        (DCAConfig(16, 4, 20), 40, 8),
        (None, 13, 4),
        (None, 40, 8),
    ],
)
def test_full_budget_equals_dense_reference(dca, chunk, block_size):
    recall = Recall()
    seqs, outs, decode_steps = run(sparse_backend(dca, recorder=recall), RAGGED, chunk, block_size)
    assert decode_steps > 0 and recall.values  # decode ran dense, prefill chunks sparse
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, dca), **TOL)
    torch.testing.assert_close(
        torch.cat(recall.values, 1),
        torch.ones(4, sum(r.shape[1] for r in recall.values)),
        atol=1e-5,
        rtol=0,
    )


def test_kernel_path_full_budget_equals_dense_reference():
    """The CUDA code path (keys-only gather, Triton kernel) under the interpreter."""
    dca = DCAConfig(16, 4, 20)
    seqs, outs, _ = run(sparse_backend(dca, use_kernel=True), [(40, 3), (9, 2)], 40, 8)
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, dca), **TOL)


def test_small_budget_is_sparse_and_recall_is_recorded():
    dca = DCAConfig(32, 8, 20)
    small = SparseConfig(default_vertical=3, default_slash=5, threshold=30, last_q=8)
    recall = Recall()
    seqs, outs, _ = run(sparse_backend(dca, small, recall), [(90, 2)], 30, 8)
    (seq,), (out,) = seqs, outs
    want = reference(seq, dca)
    assert (out.double() - want).abs().max() > 1e-3  # keys were left out ...
    torch.testing.assert_close(out[:30].double(), want[:30], **TOL)  # ... not in chunk 1
    r = torch.cat(recall.values, 1)
    assert (r > 0).all() and (r <= 1).all() and r.mean() < 0.99


def test_threshold_keeps_short_prefills_dense():
    high = SparseConfig(threshold=10**6)
    dca = DCAConfig(16, 4, 20)
    seqs, outs, _ = run(sparse_backend(dca, high), RAGGED, 13, 4)
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, dca), **TOL)


def test_registry():
    dca = DCAConfig(16, 4, 20)
    auto = make_backend("auto", model_config(dca), "cpu", SparseConfig())
    assert isinstance(auto, SparseAttentionBackend) and isinstance(auto.dense, DCAAttentionBackend)
    forced = make_backend("sparse", model_config(None), "cpu")
    assert isinstance(forced.dense, TorchAttentionBackend)
    assert isinstance(
        make_backend("torch", model_config(None), "cpu", SparseConfig()), TorchAttentionBackend
    )
    assert isinstance(make_backend("auto", model_config(None), "cpu"), TorchAttentionBackend)


def test_decode_steps_are_the_dense_backends_own():
    """Decode metadata is the dense backend's, so its CUDA graphs capture decode unchanged."""
    backend = sparse_backend(None)
    meta = backend.prepare(BatchLayout((1, 1), (40, 9), ((0, 1, 2), (3,)), 16), torch.device("cpu"))
    assert type(meta) is type(
        backend.dense.prepare(BatchLayout((1,), (9,), ((3,),), 16), torch.device("cpu"))
    )
    assert backend.supports_cuda_graphs == backend.dense.supports_cuda_graphs


def test_more_attention_calls_than_layers_is_an_error():
    backend = sparse_backend(None)
    seqs = make_seqs([(20, 0)], 8)
    cache = KVCache(torch.zeros(8, 8, 2, D), torch.zeros(8, 8, 2, D))
    meta = backend.prepare(BatchLayout((20,), (20,), (seqs[0].blocks,), 8), torch.device("cpu"))
    s = seqs[0]
    backend.forward(s.q, s.k, s.v, cache, meta)
    with pytest.raises(RuntimeError, match="layers"):
        backend.forward(s.q, s.k, s.v, cache, meta)
