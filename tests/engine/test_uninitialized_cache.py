"""The KV cache is allocated with torch.empty: rows no token has written may hold anything,
NaN included. Decode pads every sequence to the longest one; the padding must not leak."""

import pytest
import torch

from longctx import LLM, SamplingParams
from longctx.config import DCAConfig
from tests.conftest import tiny_config_file


@pytest.mark.parametrize(
    "dca", [None, DCAConfig(48, 16, original_max_position_embeddings=48)], ids=["torch", "dca"]
)
def test_nan_in_unwritten_cache_rows_does_not_reach_outputs(tmp_path, dca):
    config = tiny_config_file(tmp_path)
    prompts = [[(5 * i + j) % 128 for j in range(n)] for i, n in enumerate((3, 70, 20))]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)

    def run(fill: float):
        llm = LLM(
            model=config,
            random_weights=True,
            device="cpu",
            dtype="float32",
            block_size=16,
            kv_cache_gib=0.001,
            dca=dca,
        )
        for cache in llm.engine.runner.kv_caches:
            cache.k.fill_(fill)
            cache.v.fill_(fill)
        return llm.generate(prompts, sp)

    clean, poisoned = run(0.0), run(float("nan"))
    for a, b in zip(clean, poisoned):
        assert a.token_ids == b.token_ids
        lps = [lp for step in b.logprobs for lp in step.values()]
        assert all(torch.isfinite(torch.tensor(lps)))
