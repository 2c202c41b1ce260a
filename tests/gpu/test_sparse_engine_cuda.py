"""Sparse prefill through the engine on CUDA (the Triton estimation passes and kernel, the
sync-free selection and conversion): budgets that name every key equal the dense DCA engine,
small budgets stay close to it, and the sparse path never makes the host wait for the device.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from longctx import LLM, DCAConfig
from longctx.sparse.config import SparseConfig
from tests.engine.test_dca_engine import prompt_logprobs, random_prompts
from tests.hf_reference import checkpoint_of, tiny_hf_model

DCA = DCAConfig(chunk_size=512, local_size=128, original_max_position_embeddings=384)


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=5, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)


def make_llm(hf, sparse, dca=DCA) -> LLM:
    return LLM(
        checkpoint=checkpoint_of(hf),
        dtype="float32",
        device="cuda",
        block_size=64,
        kv_cache_gib=0.2,
        max_num_batched_tokens=256,
        dca=dca,
        sparse=sparse,
    )


@pytest.mark.parametrize("unit", ["tile", "diagonal"])
@pytest.mark.parametrize("dca", [None, DCA], ids=["plain", "dca"])
def test_full_budget_equals_dense(hf, unit, dca):
    full = SparseConfig(default_vertical=10**5, default_slash=10**5, threshold=300,
                        last_q=16, slash_unit=unit)  # fmt: skip
    prompts = random_prompts([900, 1300], seed=4)
    got, got_tok = prompt_logprobs(make_llm(hf, full, dca), prompts, max_tokens=4)
    want, want_tok = prompt_logprobs(make_llm(hf, False, dca), prompts, max_tokens=4)
    assert got_tok == want_tok
    for a, b in zip(got, want, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-3


def test_sparse_path_has_no_host_synchronisation(hf):
    """set_sync_debug_mode reports every synchronising CUDA call; none may come from the
    sparse prefill (estimation, selection, conversion, kernel)."""
    cfg = SparseConfig(default_vertical=40, default_slash=200, threshold=300, last_q=16)
    llm = make_llm(hf, cfg)
    prompt_logprobs(llm, random_prompts([1500], seed=8), max_tokens=2)  # compile first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate([random_prompts([1700], seed=9)[0]])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    sparse_sites = [s for s in sites if "/sparse/" in s or "sparse_backend" in s]
    assert not sparse_sites, sparse_sites
