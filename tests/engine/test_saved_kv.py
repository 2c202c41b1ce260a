"""Saved KV through the Python API on a tiny transformers Qwen2 (float32, CPU): a document saved
by one engine and loaded by another answers like an uncached engine; other models, settings and
damaged files are refused with one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from longctx import LLM, DCAConfig, SamplingParams
from longctx.engine.saved_kv import MANIFEST
from longctx.errors import ConfigError, OutOfKVMemoryError, SavedKVError
from tests.engine.test_dca_engine import random_prompts
from tests.engine.test_prefix_caching_engine import assert_same, tolerance
from tests.hf_reference import checkpoint_of, tiny_hf_model

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
DCA = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=32)
DOC, Q = random_prompts([150, 7], seed=21)
FULL = len(DOC) // BS * BS


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(seed=13)


def make_llm(hf, **kw) -> LLM:
    kw.setdefault("block_size", BS)
    kw.setdefault("kv_cache_gib", 0.02)
    return LLM(checkpoint=checkpoint_of(kw.pop("model", hf)), dtype="float32", device="cpu", **kw)


def shard_bytes(llm: LLM, blocks: int) -> int:
    caches = llm.engine.runner.kv_caches
    per_block = sum(t[0].numel() * t.element_size() for c in caches for t in (c.k, c.v))
    return blocks * per_block


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kv") / "doc"
    llm = make_llm(hf)
    info = llm.save_kv(DOC, directory, shard_bytes=shard_bytes(llm, 4))
    return directory, info


SETTINGS = {"plain": {}, "dca-yarn": {"dca": DCA}, "fp8": {"kv_cache_dtype": "fp8"}}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_loaded_kv_answers_like_an_uncached_engine(hf, tmp_path, settings):
    want = make_llm(hf, enable_prefix_caching=False, **settings).generate(DOC + Q, GREEDY)[0]
    saver = make_llm(hf, **settings)
    info = saver.save_kv(DOC, tmp_path / "kv", shard_bytes=shard_bytes(saver, 4))
    assert (info.num_tokens, info.num_blocks) == (FULL, FULL // BS)
    assert len(list((tmp_path / "kv").glob("kv-*.safetensors"))) == 3  # 9 blocks, 4 a shard
    loader = make_llm(hf, load_kv=tmp_path / "kv", **settings)
    assert loader.engine.prefix_cache_stats().cached_blocks == FULL // BS
    got = loader.generate(DOC + Q, GREEDY)[0]
    assert got.num_cached_tokens == FULL
    assert_same(got, want, tolerance(settings))


def test_manifest_records_identity_and_checksums(saved):
    directory, info = saved
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["num_tokens"] == FULL and manifest["prompt_tokens"] == len(DOC)
    ident = manifest["identity"]
    assert ident["block_size"] == BS and ident["dtype"] == "float32" and ident["dca"] is None
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert info.num_bytes == sum(f["bytes"] for f in manifest["files"][1:])


def test_loading_twice_loads_nothing_new(hf, saved):
    llm = make_llm(hf, load_kv=saved[0])
    assert llm.load_kv(saved[0]).num_loaded_blocks == 0
    assert llm.engine.prefix_cache_stats().cached_blocks == FULL // BS


def test_saving_over_an_earlier_save_replaces_it(hf, tmp_path):
    llm = make_llm(hf)
    llm.save_kv(DOC, tmp_path, shard_bytes=shard_bytes(llm, 2))  # 5 shards
    llm.save_kv(DOC[:40], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kv-00000.safetensors",
        MANIFEST,
        "tokens.safetensors",
    ]
    assert make_llm(hf).load_kv(tmp_path).num_blocks == 2


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"block_size": 32}, ("block_size = 16", "block_size = 32", "--block-size 16")),
        ({"dca": DCA}, ("dca = off",)),
        ({"kv_cache_dtype": "fp8"}, ("kv_cache_dtype = float32",)),
        ({"model": tiny_hf_model(seed=14)}, ("other model weights",)),
    ],
    ids=["block-size", "dca", "kv-dtype", "weights"],
)
def test_other_models_or_settings_are_refused(hf, saved, kw, words):
    llm = make_llm(hf, **kw)
    with pytest.raises(SavedKVError) as e:
        llm.load_kv(saved[0])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert llm.engine.prefix_cache_stats().cached_blocks == 0


def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved[0], tmp_path / "copy")


def test_a_truncated_shard_is_refused(hf, saved, tmp_path):
    d = copy_of(saved, tmp_path)
    shard = d / "kv-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    llm = make_llm(hf)
    with pytest.raises(SavedKVError, match="kv-00001.safetensors is truncated"):
        llm.load_kv(d)
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks and blocks.pool.num_cached <= 4


def test_a_corrupt_shard_is_refused(hf, saved, tmp_path):
    d = copy_of(saved, tmp_path)
    shard = d / "kv-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SavedKVError, match="kv-00002.safetensors is corrupt"):
        make_llm(hf).load_kv(d)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # a header length past the end
        (16).to_bytes(8, "little") + b'{"k": "v"}      ',  # a header that is no table
        # a tensor reaching past the data
        (64).to_bytes(8, "little")
        + b'{"k":{"dtype":"U8","shape":[99],"data_offsets":[0,99]}}'.ljust(64)
        + b"\0" * 8,
    ],
    ids=["length", "header", "offsets"],
)
def test_a_shard_the_writer_garbled_is_refused(hf, saved, tmp_path, garbage):
    """Bytes that match the manifest's checksum but are no safetensors file."""
    d = copy_of(saved, tmp_path)
    (d / "kv-00001.safetensors").write_bytes(garbage)
    manifest = json.loads((d / MANIFEST).read_text())
    entry = next(f for f in manifest["files"] if f["name"] == "kv-00001.safetensors")
    entry.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SavedKVError, match="kv-00001.safetensors is not a readable safetensors"):
        make_llm(hf).load_kv(d)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
        (lambda d: (d / "kv-00000.safetensors").unlink(), "kv-00000.safetensors is missing"),
        (lambda d: (d / MANIFEST).write_text("{"), "manifest.json is unreadable or corrupt"),
        (lambda d: (d / "tokens.safetensors").write_bytes(b"x"), "tokens.safetensors is trunc"),
    ],
    ids=["no-manifest", "missing-shard", "bad-manifest", "bad-tokens"],
)
def test_damaged_directories_are_refused(hf, saved, tmp_path, damage, match):
    d = copy_of(saved, tmp_path)
    damage(d)
    with pytest.raises(SavedKVError, match=match):
        make_llm(hf).load_kv(d)


def test_a_missing_directory_is_refused(hf, tmp_path):
    with pytest.raises(SavedKVError, match="not found"):
        make_llm(hf).load_kv(tmp_path / "nothing")


def test_a_cache_too_small_for_the_document_is_refused(hf, saved):
    llm = make_llm(hf, kv_cache_gib=shard_bytes(make_llm(hf), 4) / 2**30)
    with pytest.raises(OutOfKVMemoryError, match="holds 9 blocks"):
        llm.load_kv(saved[0])


def test_saved_kv_needs_prefix_caching(hf, saved, tmp_path):
    llm = make_llm(hf, enable_prefix_caching=False)
    with pytest.raises(ConfigError, match="--no-prefix-caching"):
        llm.load_kv(saved[0])
    with pytest.raises(ConfigError, match="--no-prefix-caching"):
        llm.save_kv(DOC, tmp_path)


def test_a_prompt_shorter_than_a_block_has_nothing_to_save(hf, tmp_path):
    with pytest.raises(ConfigError, match="less than one KV block"):
        make_llm(hf).save_kv(DOC[:10], tmp_path)


def test_saving_over_a_damaged_save_works(hf, tmp_path):
    (tmp_path / MANIFEST).write_text("{")
    llm = make_llm(hf)
    assert llm.save_kv(DOC, tmp_path).num_blocks == FULL // BS
    assert make_llm(hf).load_kv(tmp_path).num_loaded_blocks == FULL // BS
