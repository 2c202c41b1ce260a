"""The layer split: contiguous, non-empty, balanced by modelled cost with the embedding and the
LM head on stage 0."""

import pytest

from longctx.distributed.partition import (
    StageWorkload,
    ends_cost,
    layer_cost,
    partition_layers,
)
from longctx.errors import ConfigError
from longctx.loading import builtin_config
from tests.conftest import tiny_config_file

SEVEN_B = builtin_config("qwen2.5-7b-instruct-1m")
PREFILL = StageWorkload(tokens=32768)
DECODE = StageWorkload(tokens=64, sampled_rows=64)


def stage_costs(config, ranges, work):
    unit = layer_cost(config, work)
    return [
        len(r) * unit + (ends_cost(config, work) if s == 0 else 0) for s, r in enumerate(ranges)
    ]


@pytest.mark.parametrize("stages", [2, 3, 4, 7])
@pytest.mark.parametrize("work", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_ranges_cover_the_layers_in_order(stages, work):
    ranges = partition_layers(SEVEN_B, stages, work)
    assert len(ranges) == stages and all(len(r) > 0 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(SEVEN_B.num_layers))
    # No stage dearer than needed: moving a layer off the dearest stage would not help.
    costs = stage_costs(SEVEN_B, ranges, work)
    assert max(costs) - min(costs) <= layer_cost(SEVEN_B, work) + ends_cost(SEVEN_B, work)


def test_prefill_splits_evenly_and_decode_unloads_stage_0():
    # A 32K-token chunk makes the LM head (one row) negligible; at 64 decode rows it weighs
    # about as much as two of the 7B's layers, and stage 0 takes fewer layers.
    assert [len(r) for r in partition_layers(SEVEN_B, 2, PREFILL)] == [14, 14]
    assert [len(r) for r in partition_layers(SEVEN_B, 2, DECODE)] == [13, 15]


def test_more_stages_than_layers_is_refused(tmp_path):
    from longctx.loading.hf_dir import hf_model_config

    tiny = hf_model_config(tiny_config_file(tmp_path).parent)
    with pytest.raises(ConfigError, match="pipeline_parallel_size 3 exceeds the model's 2"):
        partition_layers(tiny, 3, PREFILL)
