"""PipelineScheduler without processes: micro-batches hold back sequences whose token is being
computed, take their share of the sequences, and cut prefills by the chunk policy."""

from longctx.distributed.engine import PipelineScheduler
from longctx.engine.dcpp import ChunkCostModel, DCPPChunks, FixedChunks
from longctx.engine.kv_cache import BlockManager
from longctx.engine.sequence import Sequence
from longctx.sampling_params import SamplingParams


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, None, list(range(1, n + 1)), SamplingParams(max_tokens=8), 4096, None)


def launch(batch) -> set[str]:
    """What the engine does at launch; returns the ids that now wait for a sampled token."""
    held = set()
    for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        if batch.samples(i):
            s.num_pending += 1
            held.add(s.request_id)
        s.num_computed_tokens += n
    return held


def scheduler(chunks, budget=64) -> PipelineScheduler:
    return PipelineScheduler(BlockManager(256, 16), 8, budget, chunks)


def test_micro_batches_share_the_sequences_and_hold_the_sampling_ones():
    sched = scheduler(FixedChunks(64))
    for i in range(4):
        sched.add(seq(f"r{i}", 10))
    held: set[str] = set()
    first = sched.schedule_micro_batch(held, 2)
    held |= launch(first)
    second = sched.schedule_micro_batch(held, 2)
    held |= launch(second)
    assert [s.request_id for s in first.seqs] == ["r0", "r1"]
    assert [s.request_id for s in second.seqs] == ["r2", "r3"]
    assert sched.schedule_micro_batch(held, 2) is None  # every token is in flight
    for s in first.seqs:  # the first micro-batch came back: its tokens are known
        s.num_pending -= 1
        s.token_ids.append(7)
    held -= {"r0", "r1"}
    decode = sched.schedule_micro_batch(held, 2)
    assert [s.request_id for s in decode.seqs] == ["r0", "r1"] and decode.num_new_tokens == (1, 1)


def test_prefill_chunks_follow_the_policy_and_do_not_hold():
    # Attention outweighs the linear layers past 100 tokens: later chunks get much shorter.
    policy = DCPPChunks(ChunkCostModel(linear_flops=100.0, pair_flops=1.0), 64, 16)
    sched = scheduler(policy, budget=64)
    sched.add(seq("long", 1000))
    lengths = []
    while (batch := sched.schedule_micro_batch(set(), 1)) is not None:
        launch(batch)  # no chunk but the last samples: the next one follows at once
        lengths.append(batch.num_new_tokens[0])
        if sum(lengths) == 1000:
            break
    ends = policy.boundaries(1000)
    assert lengths == [b - a for a, b in zip([0, *ends], ends)]
    assert lengths[0] > 3 * lengths[-2]
    assert sched.schedule_micro_batch({"long"}, 1) is None


def test_plain_schedule_is_unrestricted():
    sched = scheduler(FixedChunks(64))
    for i in range(3):
        sched.add(seq(f"r{i}", 5))
    assert len(sched.schedule().seqs) == 3
