"""The engine on the Hopper prefill kernel (sm_90): bf16, head_dim 128, 128-token blocks,
chunked prefill, dense and DCA past its first chunk with YaRN.

Reference: the same engine in float32 (the Triton kernel, checked against float64 elsewhere)
with the same weights (rounded to bf16 first). The bf16 engine on the Triton kernel is the
yardstick for rounding: the Hopper path must be as close to float32 as it is. (With the
default 0.25 init of the tiny model, bf16 rounding alone moves prompt logprobs by up to ~11 on
either kernel, so the model is built with 0.05.)"""

from __future__ import annotations

import importlib

import pytest
import torch

from longctx import LLM, DCAConfig
from tests.engine.test_dca_engine import prompt_logprobs, random_prompts
from tests.hf_reference import checkpoint_of, tiny_hf_model

ws = importlib.import_module("longctx.ops.triton.flash_prefill_ws")
pytestmark = pytest.mark.skipif(
    torch.cuda.get_device_capability() != (9, 0), reason="the Gluon kernel is sm_90 only"
)


@pytest.fixture(scope="module")
def hf():
    model = tiny_hf_model(
        seed=5,
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.05,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def run(hf, dca, monkeypatch, dtype: str, hopper: bool):
    calls = []
    launch = ws.flash_prefill_ws

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(ws, "flash_prefill_ws", counted)
    if not hopper:
        monkeypatch.setattr(ws, "supported", lambda *a: False)
    llm = LLM(
        checkpoint=checkpoint_of(hf),
        dtype=dtype,
        device="cuda",
        block_size=128,
        kv_cache_gib=0.3,
        max_num_batched_tokens=384,
        attention_backend="triton",
        dca=dca,
    )
    lps, _ = prompt_logprobs(llm, random_prompts([1000, 77, 700], seed=6), max_tokens=4)
    monkeypatch.undo()
    return [x for seq in lps for x in seq], len(calls)


@pytest.mark.parametrize(
    "dca",
    [None, DCAConfig(300, 44, original_max_position_embeddings=500)],
    ids=["dense", "dca-yarn"],
)
def test_hopper_kernel_in_the_engine(hf, dca, monkeypatch):
    hopper, calls = run(hf, dca, monkeypatch, "bfloat16", True)
    triton, triton_calls = run(hf, dca, monkeypatch, "bfloat16", False)
    ref, _ = run(hf, dca, monkeypatch, "float32", False)
    assert calls > 0 and triton_calls == 0

    def err(xs):
        return max(abs(a - b) for a, b in zip(xs, ref, strict=True))

    assert err(hopper) < 0.1, err(hopper)
    assert err(hopper) <= 1.5 * err(triton) + 1e-3, (err(hopper), err(triton))
