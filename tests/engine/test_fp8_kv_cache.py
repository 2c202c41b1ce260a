"""kv_cache_dtype="fp8" through the whole engine on tiny transformers Qwen2 models (CPU).

1. Exactness of the path: the engine with an fp8 cache equals transformers' Qwen2 whose keys
   (after RoPE, relative to each layer's zero point: the k bias rotated and averaged over the
   cached positions, computed here with transformers' own RoPE) and values are quantized and
   dequantized per (token, head) the same way, so attention over the fp8 cache is attention
   over the dequantized values and nothing else.
2. Accuracy against kv_cache_dtype="auto" (float32 cache) on the torch and DCA backends.
3. Capacity: the same kv_cache_gib holds 2 D / (D + 4) times the tokens of a 16-bit cache.
4. An unknown kv_cache_dtype is refused with a ConfigError naming it.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2

from longctx import LLM, SamplingParams
from longctx.config import DCAConfig, EngineConfig
from longctx.engine.kv_cache import allocate_kv_caches, kv_bytes_per_token, kv_cache_bytes
from longctx.errors import ConfigError
from longctx.layers.attention.kv_quant import FP8_DTYPE, dequantize_fp8, quantize_fp8
from longctx.loading import builtin_config
from tests.engine.test_dca_engine import random_prompts
from tests.hf_reference import checkpoint_of, hf_logprobs, tiny_hf_model

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=0)


def make_llm(hf, kv: str, **kw) -> LLM:
    kw.setdefault("block_size", 16)
    kw.setdefault("kv_cache_gib", 0.05)
    kw.setdefault("max_num_batched_tokens", 33)
    return LLM(checkpoint=checkpoint_of(hf), dtype="float32", device="cpu", kv_cache_dtype=kv, **kw)


def prompt_lps(out, ids) -> list[float]:
    return [out.prompt_logprobs[p][ids[p]] for p in range(1, len(ids))]


def fake_quant(x: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    return dequantize_fp8(*quantize_fp8(x, zero), x.dtype, zero)


def hf_zero_points(hf, num_positions: int) -> torch.Tensor:
    """[layers, Hkv, 1, D]: each layer's k bias rotated by transformers' RoPE at every
    position in [0, num_positions) and averaged (brute force, float64)."""
    cfg = hf.config
    d = cfg.hidden_size // cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    pos = torch.arange(num_positions)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float64), pos)
    zeros = []
    for layer in hf.model.layers:
        b = layer.self_attn.k_proj.bias.detach().double().view(1, hkv, 1, d)
        b = b.expand(1, hkv, num_positions, d)
        _, rotated = modeling_qwen2.apply_rotary_pos_emb(b, b, cos.double(), sin.double())
        zeros.append(rotated.mean(dim=2, keepdim=True)[0].float())
    return torch.stack(zeros)


@pytest.fixture
def hf_fp8_kv(monkeypatch):
    """transformers' Qwen2 with fp8 quantize-dequantize of rotated keys (relative to the zero
    points) and of values. Call with the model and the number of cached key positions."""
    rope = modeling_qwen2.apply_rotary_pos_emb
    state = {}

    def rope_then_quantize(q, k, cos, sin, *args, **kwargs):
        q, k = rope(q, k, cos, sin, *args, **kwargs)
        zeros = state["zeros"]
        layer = state["calls"] % len(zeros)  # one call per layer, in order
        state["calls"] += 1
        return q, fake_quant(k, zeros[layer])  # [B, Hkv, T, D]: one scale per (token, head)

    def quantize_values(model, num_positions: int):
        state.update(zeros=hf_zero_points(model, num_positions), calls=0)
        monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", rope_then_quantize)

        def hook(module, args, out):  # [B, T, Hkv * D]
            d = model.config.hidden_size // model.config.num_attention_heads
            return fake_quant(out.unflatten(-1, (-1, d))).flatten(-2)

        return [layer.self_attn.v_proj.register_forward_hook(hook) for layer in model.model.layers]

    return quantize_values


@pytest.mark.parametrize("backend", ["torch", "dca"])
def test_engine_equals_transformers_with_quantized_kv(hf_fp8_kv, backend):
    """The sensitive default tiny model (initializer_range 0.25), prefilled in chunks of 33:
    exact up to float32 rounding, which can move a value across an e4m3 rounding boundary
    (measured max |logprob diff| 7.9e-6)."""
    hf = tiny_hf_model(seed=5)
    # DCA with a chunk covering every prompt is plain causal attention
    dca = DCAConfig(1024, 64, 4096) if backend == "dca" else None
    llm = make_llm(hf, "fp8", attention_backend=backend, dca=dca)
    prompts = random_prompts([17, 48, 100])
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    positions = dca.chunk_len if dca else hf.config.max_position_embeddings
    handles = hf_fp8_kv(hf, positions)
    try:
        for ids, out in zip(prompts, outs, strict=True):
            ref = hf_logprobs(hf, ids)
            want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
            err = max(abs(a - b) for a, b in zip(prompt_lps(out, ids), want, strict=True))
            assert err < 1e-4, err
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "backend,dca",
    [("torch", None), ("dca", DCAConfig(64, 16, 32))],  # c = 48: up to 4 DCA chunks
    ids=["torch", "dca"],
)
def test_fp8_close_to_auto(backend, dca):
    """fp8 against a float32 cache, 4 prompts x 20 greedy tokens. A tiny model with weights of
    std 0.05 (the default 0.25 makes a chaotic model: bf16 compute alone changes 28 of these
    80 greedy tokens there). Measured here: max |prompt logprob diff| 0.030 (both backends),
    mean 0.0037, 73/80 (torch) and 75/80 (dca) greedy tokens equal; the differing tokens are
    runs after a near-tie, not isolated. Bounds: twice the measured error, 80% of tokens."""
    hf = tiny_hf_model(seed=5, initializer_range=0.05)
    prompts = random_prompts([17, 48, 100, 150], seed=3)
    kw = dict(attention_backend=backend, dca=dca)
    auto = make_llm(hf, "auto", **kw).generate(prompts, GREEDY)
    fp8 = make_llm(hf, "fp8", **kw).generate(prompts, GREEDY)
    errs, same = [], 0
    for ids, a, b in zip(prompts, auto, fp8, strict=True):
        errs += [abs(x - y) for x, y in zip(prompt_lps(a, ids), prompt_lps(b, ids), strict=True)]
        same += sum(x == y for x, y in zip(a.token_ids, b.token_ids, strict=True))
    assert max(errs) < 0.06
    assert sum(errs) / len(errs) < 0.008
    assert same >= 64
    # and the first generated token (no earlier divergence) of every prompt agrees
    assert all(a.token_ids[0] == b.token_ids[0] for a, b in zip(auto, fp8, strict=True))


def test_fp8_results_do_not_depend_on_chunk_size():
    """Attention always reads the quantized cache (a first chunk too), so chunking and
    decoding see the same values. Equal up to float32 rounding of the projections, which can
    move a value across an e4m3 rounding boundary (measured: max 1.1e-4; attention over the
    fresh unquantized keys in a first chunk would differ by the fp8 error, ~0.03)."""
    hf = tiny_hf_model(seed=5, initializer_range=0.05)
    prompts = random_prompts([48, 100], seed=4)
    a = make_llm(hf, "fp8", max_num_batched_tokens=7).generate(prompts, GREEDY)
    b = make_llm(hf, "fp8", max_num_batched_tokens=1000).generate(prompts, GREEDY)
    for ids, x, y in zip(prompts, a, b, strict=True):
        assert x.token_ids == y.token_ids
        diff = [abs(u - w) for u, w in zip(prompt_lps(x, ids), prompt_lps(y, ids), strict=True)]
        assert max(diff) < 1e-3


def test_capacity_doubles_for_a_16_bit_model():
    hf = tiny_hf_model(seed=5)  # head_dim 16
    kw = dict(kv_cache_gib=0.05, dtype="bfloat16", device="cpu", block_size=16)
    bf16 = LLM(checkpoint=checkpoint_of(hf), **kw).engine.runner
    fp8 = LLM(checkpoint=checkpoint_of(hf), kv_cache_dtype="fp8", **kw).engine.runner
    assert bf16.kv_dtype == torch.bfloat16 and fp8.kv_dtype == FP8_DTYPE
    d = 16  # per token and head: 2 d bytes against d + 4 (a float32 scale)
    assert fp8.num_blocks == int(0.05 * 2**30 // (16 * 2 * 2 * 2 * (d + 4)))
    assert fp8.num_blocks / bf16.num_blocks == pytest.approx(2 * d / (d + 4), rel=1e-3)
    cache = fp8.kv_caches[0]
    assert cache.k.dtype == FP8_DTYPE and cache.k_scale.dtype == torch.float32
    assert cache.k_scale.shape == cache.k.shape[:3] == cache.v_scale.shape
    zero_points = 2 * 2 * d * 4  # float32 [layers, Hkv, D]
    assert kv_cache_bytes(fp8.kv_caches) <= 0.05 * 2**30 + 2 * 16 * 2 * 2 * (d + 4) + zero_points


def test_one_million_tokens_of_the_7b_model():
    """Qwen2.5-7B-Instruct-1M (28 layers, 4 kv heads, d = 128): a 1M-token cache is 56 GiB in
    bf16 and 28.9 GiB in fp8 with its scales (fits one 80 GB GPU beside 15 GB of weights)."""
    cfg = builtin_config("qwen2.5-7b-instruct-1m")
    tokens = 2**20
    bf16 = kv_bytes_per_token(cfg, torch.bfloat16) * tokens
    fp8 = kv_bytes_per_token(cfg, FP8_DTYPE) * tokens
    assert bf16 == 2 * 28 * 4 * 128 * 2 * tokens
    assert fp8 == 2 * 28 * 4 * (128 + 4) * tokens
    assert bf16 / 2**30 == 56.0 and round(fp8 / 2**30, 1) == 28.9
    # the allocation holds what kv_bytes_per_token counts, and the keys' zero points
    caches = allocate_kv_caches(cfg, 2, 64, FP8_DTYPE, torch.device("meta"))
    zero_points = 28 * 4 * 128 * 4
    assert kv_cache_bytes(caches) == kv_bytes_per_token(cfg, FP8_DTYPE) * 2 * 64 + zero_points


@pytest.mark.parametrize("name", ["int8", "fp16", "FP8", "fp8_e5m2"])
def test_unknown_kv_cache_dtype_is_refused(name):
    with pytest.raises(ConfigError, match=f"kv_cache_dtype.*{name!r}"):
        EngineConfig(kv_cache_dtype=name)
    with pytest.raises(ConfigError, match=repr(name)):
        LLM(checkpoint=checkpoint_of(tiny_hf_model(seed=5)), device="cpu", kv_cache_dtype=name)


@pytest.mark.parametrize("name", ["auto", "fp8", "fp8_e4m3"])
def test_known_kv_cache_dtypes(name):
    assert EngineConfig(kv_cache_dtype=name).kv_cache_dtype == name


@pytest.mark.parametrize("backend", ["torch", "dca"])
def test_nan_in_unwritten_fp8_rows_and_scales_does_not_reach_outputs(backend):
    """Rows (and their scales) no token wrote are torch.empty memory: NaN there must not leak
    into decode, whose batch pads every sequence to the longest one."""
    hf = tiny_hf_model(seed=5, initializer_range=0.05)
    dca = DCAConfig(48, 16, 48) if backend == "dca" else None
    prompts = random_prompts([3, 70, 20], seed=6)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)

    def run(fill: float):
        llm = make_llm(hf, "fp8", attention_backend=backend, dca=dca, kv_cache_gib=0.001)
        for cache in llm.engine.runner.kv_caches:
            for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
                t.fill_(fill)
        return llm.generate(prompts, params)

    for a, b in zip(run(0.0), run(float("nan")), strict=True):
        assert a.token_ids == b.token_ids
        assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in b.logprobs)
