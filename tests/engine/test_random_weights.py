import pytest

from longctx import LLM, SamplingParams
from longctx.errors import ConfigError
from longctx.loading import builtin_config, random_checkpoint
from tests.conftest import tiny_config_file


def test_builtin_1m_configs_have_the_published_shapes():
    c7, c14 = builtin_config("qwen2.5-7b-instruct-1m"), builtin_config("qwen2.5-14b-instruct-1m")
    assert (c7.num_layers, c7.num_heads, c7.num_kv_heads, c7.head_dim) == (28, 28, 4, 128)
    assert (c14.num_layers, c14.num_heads, c14.num_kv_heads) == (48, 40, 8)
    assert c7.dca.chunk_size == 262144 and c7.dca.local_size == 8192
    assert random_checkpoint("qwen2.5-7b-instruct-1m").weights is None


def test_random_weights_from_a_config_file(tmp_path):
    path = tiny_config_file(tmp_path, max_position_embeddings=256)
    llm = LLM(model=path, random_weights=True, device="cpu", kv_cache_gib=0.01, block_size=16)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 5


def test_random_weights_need_a_config():
    with pytest.raises(ConfigError):
        random_checkpoint("no-such-config")
