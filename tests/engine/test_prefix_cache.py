"""Prefix-cache bookkeeping on the CPU without a model: hash chains, reference counts, LRU
eviction, admission, fork, and the scheduler's use of them."""

import pytest
import torch

from longctx.engine.kv_cache import BlockManager, copy_blocks
from longctx.engine.prefix_cache import BlockPool, chain_hash, extend_hashes
from longctx.engine.scheduler import Scheduler
from longctx.engine.sequence import Sequence
from longctx.layers.attention import KVCache
from longctx.sampling_params import SamplingParams

BS = 4
ROOT = b"root"


def seq(tokens, rid="r", **params) -> Sequence:
    return Sequence(
        request_id=rid,
        prompt=None,
        prompt_token_ids=list(tokens),
        params=SamplingParams(max_tokens=params.pop("max_tokens", 4), **params),
        max_model_len=1000,
        detokenizer=None,
    )


def computed(manager: BlockManager, s: Sequence, n: int) -> None:
    """Admit s with its hit, compute up to n tokens and commit them, as one step would."""
    manager.admit(s, manager.prefix_hit(s))
    manager.grow(s.block_table, n)
    s.num_computed_tokens = n
    manager.commit(s)


# --- hashes ------------------------------------------------------------------------------------
def test_hash_chain_names_the_whole_prefix():
    a, b = [], []
    extend_hashes(ROOT, a, [1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    extend_hashes(ROOT, b, [9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2  # the partial third block has no hash
    assert a[1] != b[1]  # same second block, different first: different names
    assert a[0] == chain_hash(ROOT, [1, 2, 3, 4])
    other_root = []
    extend_hashes(b"other settings", other_root, [1, 2, 3, 4], BS)
    assert other_root[0] != a[0]


def test_extend_hashes_only_adds_new_full_blocks():
    h = []
    extend_hashes(ROOT, h, [1, 2, 3], BS)
    assert h == []
    extend_hashes(ROOT, h, [1, 2, 3, 4, 5], BS)
    first = h[0]
    extend_hashes(ROOT, h, [1, 2, 3, 4, 5, 6, 7, 8], BS)
    assert h[0] is first and len(h) == 2


# --- pool --------------------------------------------------------------------------------------
def test_released_hashed_blocks_stay_cached_and_count_as_free():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    assert pool.register(blocks[0], b"h0")
    pool.release(blocks)
    assert pool.num_free == 4 and pool.num_cached == 1
    assert pool.lookup([b"h0", b"h1"]) == [blocks[0]]


def test_eviction_takes_free_blocks_first_then_least_recently_released():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for blk, h in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.register(blk, h)
    pool.release([b])
    pool.release([a])
    pool.release([c])  # LRU order now: b, a, c
    assert pool.allocate(1) == [b]
    assert pool.lookup([b"b"]) == [] and pool.lookup([b"a"]) == [a]
    assert pool.allocate(1) == [a]
    assert pool.num_cached == 1


def test_a_table_is_released_tail_first():
    pool = BlockPool(3)
    table = pool.allocate(3)
    for i, blk in enumerate(table):
        pool.register(blk, bytes([i]))
    pool.release(table)
    assert pool.allocate(1) == [table[2]]  # the head of the chain outlives its tail


def test_held_blocks_are_never_evicted():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"a")
    pool.register(b, b"b")
    pool.release([a])
    pool.acquire([a])  # a hit takes it off the LRU list
    assert pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.release([a, b])
    assert pool.num_free == 2 and pool.refs(a) == 0


def test_same_content_twice_keeps_the_first_name():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.register(a, b"h") and not pool.register(b, b"h")
    pool.release([a, b])
    assert pool.num_cached == 1 and pool.allocate(1) == [b]  # the unnamed one went back free


def test_forget_all_frees_cached_blocks():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"a")
    pool.release([a])
    pool.forget_all()
    assert pool.num_cached == 0 and pool.num_free == 1 and pool.lookup([b"a"]) == []
    pool.release([b])
    assert pool.num_free == 2


# --- manager -----------------------------------------------------------------------------------
def test_a_second_sequence_hits_the_first_ones_blocks_but_recomputes_the_last_token():
    m = BlockManager(16, BS, prefix_root=ROOT)
    first = seq(range(1, 13), "a")  # 12 tokens: 3 full blocks
    computed(m, first, 12)
    m.release_seq(first, keep=True)
    same = seq(range(1, 13), "b")
    hit = m.prefix_hit(same)
    assert len(hit) == 2  # the third block holds the last token: recomputed
    longer = seq([*range(1, 13), 50, 51], "c")
    assert m.prefix_hit(longer) == first_blocks(m, 3)
    m.admit(longer, m.prefix_hit(longer))
    assert longer.num_computed_tokens == 12 and longer.num_cached_tokens == 12
    assert [m.pool.refs(b) for b in longer.block_table] == [1, 1, 1]
    stats = m.stats()
    assert (stats.queried_tokens, stats.hit_tokens, stats.cached_blocks) == (26, 12, 3)


def first_blocks(m: BlockManager, n: int) -> list[int]:
    h = []
    extend_hashes(ROOT, h, list(range(1, 4 * n + 1)), BS)
    return m.pool.lookup(h)


def test_shared_blocks_have_one_reference_per_sequence():
    m = BlockManager(16, BS, prefix_root=ROOT)
    a = seq(range(1, 10), "a")
    computed(m, a, 9)
    b = seq([*range(1, 9), 77, 78], "b")
    computed(m, b, 10)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and b.block_table[2] != a.block_table[2]
    assert [m.pool.refs(x) for x in shared] == [2, 2]
    m.release_seq(a, keep=True)
    assert [m.pool.refs(x) for x in shared] == [1, 1]
    assert m.num_free == 16 - 3  # b holds 3 blocks; a's tail block is cached or free
    m.release_seq(b, keep=True)
    assert m.num_free == 16 and all(m.pool.refs(x) == 0 for x in range(16))


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    m = BlockManager(16, BS, prefix_root=ROOT)
    computed(m, seq(range(1, 13), "a"), 12)
    assert m.prefix_hit(seq(range(1, 13), "b", prompt_logprobs=0)) == []


def test_caching_off_shares_nothing():
    m = BlockManager(16, BS)
    a = seq(range(1, 13), "a")
    computed(m, a, 12)
    m.release_seq(a, keep=True)
    assert m.prefix_hit(seq(range(1, 13), "b")) == [] and m.pool.num_cached == 0


def test_an_abort_commits_nothing_new():
    m = BlockManager(16, BS, prefix_root=ROOT)
    a = seq(range(1, 13), "a")
    m.admit(a, [])
    m.grow(a.block_table, 12)
    a.num_computed_tokens = 12  # queued, but the step may fail: not committed yet
    m.release_seq(a, keep=False)
    assert m.pool.num_cached == 0 and m.num_free == 16


def test_admission_counts_cached_blocks_it_takes_off_the_free_list():
    m = BlockManager(4, BS, prefix_root=ROOT)
    a = seq(range(1, 13), "a")
    computed(m, a, 12)
    m.release_seq(a, keep=True)  # 3 cached, 1 free: all 4 "free"
    b = seq([*range(1, 13), *range(20, 28)], "b")  # 20 tokens: 3 hit + 2 new blocks
    hit = m.prefix_hit(b)
    assert len(hit) == 3
    assert not m.can_admit(hit, 20)
    assert m.can_admit(hit, 16)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    m = BlockManager(8, BS, prefix_root=ROOT)
    parent = m.pool.allocate(3)  # 10 tokens: 2 full blocks and a partial one
    child, copy = m.fork(parent, 10)
    assert child[:2] == parent[:2] and child[2] not in parent
    assert copy == (parent[2], child[2])
    assert [m.pool.refs(b) for b in parent] == [2, 2, 1]
    even, none = m.fork(parent, 8)
    assert even == parent[:2] and none is None
    m.release(child)
    m.release(even)
    m.release(parent)
    assert m.num_free == 8


def test_copy_blocks_copies_values_and_scales():
    k = torch.arange(3 * BS * 2, dtype=torch.float32).view(3, BS, 2, 1)
    scale = torch.arange(3 * BS * 2, dtype=torch.float32).view(3, BS, 2)
    cache = KVCache(k=k.clone(), v=k.clone(), k_scale=scale.clone(), v_scale=scale.clone())
    copy_blocks((cache,), [(0, 2)])
    assert torch.equal(cache.k[2], k[0]) and torch.equal(cache.v_scale[2], scale[0])
    assert torch.equal(cache.k[1], k[1])


# --- scheduler ---------------------------------------------------------------------------------
def run_step(sched: Scheduler):
    """Schedule and pretend the step ran: computed counters advance, a token per sampler."""
    batch = sched.schedule()
    for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        sampled = batch.samples(i)
        s.num_computed_tokens += n
        if sampled:
            s.token_ids.append(5)
    return batch


def test_a_request_for_a_document_being_prefilled_waits_and_shares_it():
    m = BlockManager(32, BS, prefix_root=ROOT)
    sched = Scheduler(m, max_num_seqs=4, max_num_batched_tokens=8)
    doc = list(range(1, 25))  # 6 blocks, prefilled 8 tokens a step
    a, b = seq([*doc, 90], "a"), seq([*doc, 91], "b")
    sched.add(a)
    sched.add(b)
    batch = run_step(sched)
    assert batch.seqs == (a,)  # b's first block is a's to compute
    while b not in sched.running:
        run_step(sched)
    assert b.num_cached_tokens == 24
    assert b.block_table[:6] == a.block_table[:6]


def test_an_unrelated_request_is_not_held_back_by_a_waiting_one():
    m = BlockManager(32, BS, prefix_root=ROOT)
    sched = Scheduler(m, max_num_seqs=4, max_num_batched_tokens=12)
    doc = list(range(1, 9))
    sched.add(seq([*doc, 90], "a"))
    sched.add(seq([*doc, 91], "b"))
    sched.add(seq([200, 201], "c"))
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["a", "c"]


def test_preemption_releases_references_and_the_victim_hits_its_own_blocks():
    m = BlockManager(6, BS, prefix_root=ROOT)
    sched = Scheduler(m, max_num_seqs=4, max_num_batched_tokens=64)
    a = seq(range(1, 13), "a", max_tokens=8)
    b = seq(range(100, 112), "b", max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 3 blocks each, cache full
    run_step(sched)  # a needs a 4th block: b (the later one) is preempted
    assert b in sched.waiting and b.block_table == [] and b.num_computed_tokens == 0
    assert all(m.pool.refs(x) == 1 for x in a.block_table)
    sched.finish(a, "stop")
    batch = run_step(sched)
    assert b in batch.seqs and b.num_computed_tokens == 13  # 12 from the cache, then 1
    sched.finish(b, "stop")
    assert m.num_free == 6 and all(m.pool.refs(x) == 0 for x in range(6))
