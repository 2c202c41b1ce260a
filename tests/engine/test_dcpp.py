"""DCPP chunk planning: equal modelled cost per chunk on the 7B-1M shape at 1M tokens."""

import pytest

from longctx.engine.dcpp import ChunkCostModel, DCPPChunks, FixedChunks, plan_chunks
from longctx.loading import builtin_config
from longctx.sparse.config import SparseConfig

TOKENS = 1_000_000
CAP = 32768
ALIGN = 128
MODEL = builtin_config("qwen2.5-7b-instruct-1m")


def chunk_costs(cost: ChunkCostModel, chunks) -> list[float]:
    out, pos = [], 0
    for n in chunks:
        out.append(cost.cost(pos, n))
        pos += n
    return out


def spread(costs: list[float]) -> float:
    """The largest relative distance of a chunk's cost from the mean."""
    mean = sum(costs) / len(costs)
    return max(abs(c - mean) / mean for c in costs)


CASES = {
    "dense-dca": (MODEL, None),
    "dense-no-dca": (MODEL.with_dca(None), None),
    "sparse-dca": (MODEL, SparseConfig()),
    "sparse-dca-per-part": (MODEL, SparseConfig(dca_budget="per_part")),
    "sparse-no-dca": (MODEL.with_dca(None), SparseConfig()),
}


@pytest.mark.parametrize("case", CASES)
def test_chunks_equalise_modelled_cost_at_1m(case):
    model, sparse = CASES[case]
    cost = ChunkCostModel.of(model, sparse)
    chunks = plan_chunks(TOKENS, cost, CAP, ALIGN)
    assert sum(chunks) == TOKENS
    assert all(0 < n <= CAP for n in chunks)
    assert all(n % ALIGN == 0 for n in chunks[:-1])
    assert spread(chunk_costs(cost, chunks)) < 0.10
    if sparse is None:  # later chunks see longer histories: they get fewer tokens
        assert chunks[-1] < chunks[0] / 10


def test_fixed_chunks_are_far_from_equal_cost():
    # The check above can fail: fixed 32K chunks differ in cost by about 20x at 1M, dense.
    cost = ChunkCostModel.of(MODEL)
    fixed = [CAP] * (TOKENS // CAP) + [TOKENS % CAP]
    costs = chunk_costs(cost, fixed[:-1])
    assert max(costs) / min(costs) > 15


def test_dense_cost_adds_up_to_the_whole_prompt():
    # Dense FLOPs do not depend on the chunking; ~2.2e17 attention FLOPs at 1M (DESIGN.md 5).
    cost = ChunkCostModel.of(MODEL)
    chunks = plan_chunks(TOKENS, cost, CAP, ALIGN)
    assert sum(chunk_costs(cost, chunks)) == pytest.approx(cost.cost(0, TOKENS), rel=1e-9)
    attention = cost.cost(0, TOKENS) - TOKENS * cost.linear_flops
    assert 2.0e17 < attention < 2.4e17


def test_sparse_chunks_past_the_threshold_are_cheaper_than_dense():
    dense, sparse = ChunkCostModel.of(MODEL), ChunkCostModel.of(MODEL, SparseConfig())
    assert sparse.cost(0, 1000) == dense.cost(0, 1000)  # below the threshold: dense
    assert sparse.cost(900_000, CAP) < dense.cost(900_000, CAP) / 5


def test_policies_follow_the_plan_from_any_start():
    cost = ChunkCostModel.of(MODEL)
    policy = DCPPChunks(cost, CAP, ALIGN)
    ends = policy.boundaries(TOKENS)
    assert policy.next_chunk(0, TOKENS) == ends[0]
    assert policy.next_chunk(ends[3], TOKENS) == ends[4] - ends[3]
    assert policy.next_chunk(ends[3] + 5, TOKENS) == ends[4] - ends[3] - 5  # a cut-short chunk
    assert policy.next_chunk(0, 1000) == 1000  # short prompts: one chunk
    assert FixedChunks(CAP).next_chunk(12345, TOKENS) == CAP
