"""Saved KV: a document's cached KV blocks on disk, loaded into another engine's prefix cache so
that a prompt starting with the document skips their prefill.

A directory holds:

    manifest.json          written last (a directory without it is an incomplete save):
                           format, version, the CacheIdentity (weights fingerprint, dtypes,
                           block size, DCA, sparse), token count, token-ids sha256, and per
                           file its size and sha256
    tokens.safetensors     "token_ids" int64 [num_blocks * block_size]
    kv-00000.safetensors   blocks [first_block, first_block + num_blocks): one tensor per cache
    kv-00001.safetensors   field (k, v; an fp8 cache also k_scale, v_scale), all layers,
    ...                    [num_layers, blocks, block_size, kv_heads(, head_dim)]

Only full blocks are saved (the prefix cache names nothing else). Shards are at most
`shard_bytes`, so saving and loading hold a few shards in host memory whatever the document's
length (a load: up to WORKERS shards, each as file bytes and as tensors); reading,
checksumming and parsing run in worker threads while the main thread copies finished shards
into the cache. Measured on the 2-core CPU machine (shared): 512 MiB saved in 4.6-6.5 s and
loaded in 2.1 s (about 250 MiB/s: read, sha256 and parse took 0.2 s each per 256 MiB shard,
before tensors became views of the file's bytes instead of a GIL-holding parse).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from longctx.engine.prefix_cache import extend_hashes
from longctx.errors import ConfigError, OutOfKVMemoryError, SavedKVError
from longctx.layers.attention import KVCache
from longctx.layers.attention.kv_quant import as_bytes

if TYPE_CHECKING:
    from longctx.engine.kv_cache import BlockManager
    from longctx.engine.llm_engine import LLMEngine

FORMAT = "longctx-saved-kv"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
DEFAULT_SHARD_BYTES = 256 * 2**20
FIELDS = ("k", "v", "k_scale", "v_scale")
# Shards read, checksummed and parsed at once (hashlib and file reads release the GIL).
WORKERS = max(2, min(8, os.cpu_count() or 2))
# Settings compared before the weights fingerprint, so a mismatch names the setting.
CHECKED = ("num_layers", "num_kv_heads", "head_dim", "dtype", "kv_cache_dtype", "block_size")
CHECKED_FLAGS = {"block_size": "--block-size", "dtype": "--dtype"}

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SavedKV:
    """What a save wrote or a load read."""

    directory: Path
    num_tokens: int  # tokens of the saved full blocks
    num_blocks: int
    num_bytes: int  # of the KV shards
    num_loaded_blocks: int = 0  # a load: blocks written into the cache (the rest were cached)


# --- save ----------------------------------------------------------------------------------------
def save_kv(
    engine: LLMEngine,
    token_ids: list[int],
    directory: str | os.PathLike[str],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> SavedKV:
    """Write the cached full blocks of token_ids (prefilled before: LLM.save_kv does both)."""
    blocks_mgr = _caching_blocks(engine, "saving KV")
    bs = blocks_mgr.block_size
    num_blocks = len(token_ids) // bs
    if num_blocks == 0:
        raise ConfigError(
            f"the prompt has {len(token_ids)} tokens, less than one KV block ({bs}): "
            "nothing to save"
        )
    hashes: list[bytes] = []
    extend_hashes(blocks_mgr.prefix_root, hashes, token_ids, bs)
    blocks = blocks_mgr.pool.lookup(hashes)
    if len(blocks) < num_blocks:
        raise OutOfKVMemoryError(
            f"only {len(blocks)} of the prompt's {num_blocks} KV blocks are cached (evicted by "
            "other requests, or the cache is smaller than the prompt): raise kv_cache_gib"
        )
    out = Path(directory)
    _prepare_directory(out)
    caches = engine.runner.kv_caches
    per_shard = max(1, shard_bytes // _block_bytes(caches))
    ranges = [(a, min(a + per_shard, num_blocks)) for a in range(0, num_blocks, per_shard)]
    blocks_mgr.pool.acquire(blocks)  # no eviction while they are read
    try:
        files = [_write_tensors(out / TOKENS, {"token_ids": _tokens_tensor(token_ids, bs)})]
        bar = _bar("save KV", num_blocks * _block_bytes(caches), progress)
        gathered = ((i, a, b, _gather(caches, blocks[a:b])) for i, (a, b) in enumerate(ranges))
        write = lambda item: _write_shard(out, *item)
        for entry in _bounded_map(write, gathered):
            files.append(entry)
            bar.update(entry["bytes"])
        bar.close()
    finally:
        blocks_mgr.pool.release(blocks)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": engine.cache_identity.as_dict(),
        "model_source": engine.checkpoint.source,
        "num_tokens": num_blocks * bs,
        "prompt_tokens": len(token_ids),
        "num_blocks": num_blocks,
        "token_ids_sha256": _tokens_digest(token_ids[: num_blocks * bs]),
        "files": files,
    }
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    kv_bytes = sum(f["bytes"] for f in files[1:])
    return SavedKV(out, num_blocks * bs, num_blocks, kv_bytes)


def _prepare_directory(out: Path) -> None:
    """Create out, or clear what an earlier save wrote there (only the files it listed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        old = out / MANIFEST
        if old.exists():
            try:
                listed = [str(f.get("name", "")) for f in _read_manifest(out).get("files", [])]
            except (SavedKVError, AttributeError):  # a damaged earlier save: keep its files
                listed = []
            old.unlink()
            for name in listed:
                if name and Path(name).name == name:
                    (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise SavedKVError(f"cannot write saved KV to {out}: {e.strerror or e}") from None


def _block_bytes(caches: tuple[KVCache, ...]) -> int:
    return sum(
        t[0].numel() * t.element_size() * len(caches)
        for t in (getattr(caches[0], f) for f in FIELDS)
        if t is not None
    )


def _gather(caches: tuple[KVCache, ...], blocks: list[int]) -> dict[str, torch.Tensor]:
    """The blocks of every layer, per field, on the host: [layers, blocks, ...]."""
    idx = torch.tensor(blocks, device=caches[0].k.device)
    out = {}
    for name in FIELDS:
        if getattr(caches[0], name) is None:
            continue
        # through uint8 views: not every device indexes float8 tensors
        rows = [as_bytes(getattr(c, name)).index_select(0, idx) for c in caches]
        out[name] = torch.stack(rows).cpu().view(getattr(caches[0], name).dtype)
    return out


def _write_shard(
    out: Path, index: int, first: int, end: int, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    entry = _write_tensors(out / f"kv-{index:05d}.safetensors", tensors)
    return {**entry, "first_block": first, "num_blocks": end - first}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    data = safetensors.torch.save(tensors)
    _write_atomic(path, data)
    return {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        raise SavedKVError(f"cannot write {path}: {e.strerror or e}") from None


def _tokens_tensor(token_ids: list[int], bs: int) -> torch.Tensor:
    return torch.tensor(token_ids[: len(token_ids) // bs * bs], dtype=torch.int64)


def _tokens_digest(token_ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


# --- load ----------------------------------------------------------------------------------------
def load_kv(
    engine: LLMEngine, directory: str | os.PathLike[str], *, progress: bool = False
) -> SavedKV:
    """Put the saved blocks into the engine's prefix cache (as cached, unheld blocks: a prompt
    starting with the document then hits them; memory pressure may evict them like any)."""
    src = Path(directory)
    blocks_mgr = _caching_blocks(engine, "loading saved KV")
    manifest = _read_manifest(src)
    _check_identity(manifest, engine, src)
    files = _file_entries(manifest, src)
    num_blocks = int(manifest["num_blocks"])
    if num_blocks > blocks_mgr.num_free:
        raise OutOfKVMemoryError(
            f"saved KV in {src} holds {num_blocks} blocks, the cache has {blocks_mgr.num_free} "
            f"free of {blocks_mgr.num_blocks}: raise kv_cache_gib"
        )
    token_ids = _read_file(src, files[0])["token_ids"].tolist()
    if len(token_ids) != num_blocks * blocks_mgr.block_size or _tokens_digest(token_ids) != (
        manifest.get("token_ids_sha256")
    ):
        raise SavedKVError(f"{src / TOKENS} does not match the manifest's token ids")
    hashes: list[bytes] = []
    extend_hashes(blocks_mgr.prefix_root, hashes, token_ids, blocks_mgr.block_size)
    held: list[int] = []
    loaded = 0
    bar = _bar("load KV", sum(f["bytes"] for f in files[1:]), progress)
    try:
        read = lambda f: (f, _read_file(src, f))
        for entry, tensors in _bounded_map(read, files[1:]):
            loaded += _load_shard(engine, entry, tensors, hashes, held, src)
            bar.update(entry["bytes"])
    finally:
        bar.close()
        blocks_mgr.pool.release(held)
    return SavedKV(src, len(token_ids), num_blocks, sum(f["bytes"] for f in files[1:]), loaded)


def _caching_blocks(engine: LLMEngine, what: str) -> BlockManager:
    blocks = engine.scheduler.blocks
    if not blocks.caching:
        raise ConfigError(f"{what} needs prefix caching: drop --no-prefix-caching")
    return blocks


def _read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    if not src.is_dir():
        raise SavedKVError(f"saved KV directory not found: {src}")
    if not path.exists():
        raise SavedKVError(f"{src} has no {MANIFEST}: not saved KV, or an unfinished save")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SavedKVError(f"{path} is unreadable or corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SavedKVError(f"{path} is not a longctx saved-KV manifest")
    if manifest.get("version") != VERSION:
        raise SavedKVError(
            f"{path} has format version {manifest.get('version')}; this longctx reads {VERSION}"
        )
    return manifest


def _check_identity(manifest: dict[str, Any], engine: LLMEngine, src: Path) -> None:
    saved = manifest.get("identity") or {}
    here = engine.cache_identity.as_dict()
    for key in (*CHECKED, "dca", "sparse"):
        if saved.get(key) != here[key]:
            hint = f" (pass {CHECKED_FLAGS[key]} {saved.get(key)})" if key in CHECKED_FLAGS else ""
            raise SavedKVError(
                f"saved KV in {src} was made with {key} = {_show(saved.get(key))}, this engine "
                f"runs {key} = {_show(here[key])}{hint}"
            )
    if saved.get("model") != here["model"]:
        raise SavedKVError(
            f"saved KV in {src} was made with other model weights (from "
            f"{manifest.get('model_source')!r}; this engine runs {engine.checkpoint.source!r})"
        )


def _show(value: Any) -> str:
    return "off" if value is None else json.dumps(value) if isinstance(value, dict) else str(value)


def _file_entries(manifest: dict[str, Any], src: Path) -> list[dict[str, Any]]:
    files = manifest.get("files")
    ok = isinstance(files, list) and files and files[0].get("name") == TOKENS
    if not ok or sum(int(f.get("num_blocks", 0)) for f in files[1:]) != manifest.get("num_blocks"):
        raise SavedKVError(f"{src / MANIFEST} lists no consistent set of files")
    return files


def _read_file(src: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read, check size and sha256, parse (worker threads run this)."""
    path = src / entry["name"]
    try:
        with path.open("rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
    except FileNotFoundError:
        raise SavedKVError(f"{path} is missing") from None
    except OSError as e:
        raise SavedKVError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) != entry["bytes"]:
        raise SavedKVError(f"{path} is truncated: {len(data)} of {entry['bytes']} bytes")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SavedKVError(f"{path} is corrupt: its sha256 differs from the manifest's")
    try:
        return _tensors_in(data)
    except Exception as e:  # the checksum matched, so the writer wrote garbage
        raise SavedKVError(f"{path} is not a readable safetensors file: {e}") from None


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "U8": torch.uint8,
}  # fmt: skip


def _tensors_in(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, as views of those bytes. Not
    safetensors.torch.load: it copies every byte while holding the GIL (1.7 GiB/s on this
    CPU, no faster in two threads), the bottleneck of a load (a 1M-token document's 12 GB
    took 10.7 s on an H100 machine); the format is a length, a JSON header and raw
    little-endian tensors, which torch.frombuffer views without a copy."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + n]))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if not 0 <= start <= end <= len(data) - base:
            raise ValueError(f"{name}: offsets {start}..{end} outside the file")
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - start, offset=base + start)
        out[name] = flat.view(dtype).view(info["shape"])
    return out


def _load_shard(
    engine: LLMEngine,
    entry: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    hashes: list[bytes],
    held: list[int],
    src: Path,
) -> int:
    """Copy a shard's blocks not cached yet into fresh blocks and name them; returns how many.
    Blocks of the document already cached are held too, so that allocating the others cannot
    evict them and break the chain."""
    pool = engine.scheduler.blocks.pool
    first, n = int(entry["first_block"]), int(entry["num_blocks"])
    caches = engine.runner.kv_caches
    _check_shard(caches, tensors, n, src / entry["name"])
    cached = [pool.lookup([hashes[first + i]]) for i in range(n)]
    for found in cached:
        pool.acquire(found)
        held.extend(found)
    todo = [i for i in range(n) if not cached[i]]
    if not todo:
        return 0
    blocks = pool.allocate(len(todo))
    held.extend(blocks)
    rows = torch.tensor(todo) if len(todo) < n else None  # None: all of them, no copy
    idx = torch.tensor(blocks, device=caches[0].k.device)
    for name, t in tensors.items():
        t = (t if rows is None else t.index_select(1, rows)).to(caches[0].k.device)
        for layer, cache in enumerate(caches):
            as_bytes(getattr(cache, name))[idx] = as_bytes(t[layer])
    for i, block in zip(todo, blocks):
        pool.register(block, hashes[first + i])
    return len(todo)


def _check_shard(
    caches: tuple[KVCache, ...], tensors: dict[str, torch.Tensor], n: int, path: Path
) -> None:
    want = {f: getattr(caches[0], f) for f in FIELDS if getattr(caches[0], f) is not None}
    if set(tensors) != set(want):
        raise SavedKVError(f"{path} holds {sorted(tensors)}, expected {sorted(want)}")
    for name, ref in want.items():
        shape = (len(caches), n, *ref.shape[1:])
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != ref.dtype:
            raise SavedKVError(
                f"{path}: {name} is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                f"expected {shape} {ref.dtype}"
            )


# --- helpers -------------------------------------------------------------------------------------
def _bounded_map(fn: Callable[[T], R], items: Iterable[T], window: int = WORKERS) -> Iterator[R]:
    """fn over items in worker threads, results in order, at most `window` in flight (so at
    most that many shards sit in host memory)."""
    with ThreadPoolExecutor(max_workers=window) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _bar(desc: str, total: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )
