"""Vertical-slash sparse prefill on one GPU (issue "Sparse prefill"), 7B-1M head layout.

  PYTHONPATH=. python benchmarks/bench_sparse_gpu.py --out $OUT            # full (~6-8 min)
  PYTHONPATH=. python benchmarks/bench_sparse_gpu.py --quick --out $OUT    # 128K only (~1 min)
  PYTHONPATH=. python benchmarks/bench_sparse_gpu.py --lengths 1024 --skip-configs --skip-ttft \
      --out $OUT                                                  # the 1M rows, DCA ones too

28 q / 4 kv heads, d=128, bf16, keys/values in a paged cache (64-token pages, shuffled table).
Random weights give random attention (DESIGN.md section 5), so the kernel runs FIXED patterns at
the default budget (1000 vertical / 6096 slash per head), per head:

    local   columns: 30 sinks + 970 random; slashes: the 6096 diagonals nearest the main one
    mixed   the same columns; 90% of the slashes nearest the main diagonal, 10% spread uniformly
    model   what the default model (Qwen2.5-Coder-0.5B) selects at 16K on real text
            (benchmarks/capture_pattern_cpu.py: 125 vertical / 762 slash per head, 24 layers x
            14 heads; 7B head h takes 0.5B head h mod 14), rescaled to the length: positions
            times length / 16K, each column widened to 11 adjacent ones and each diagonal to 8
            (the default budget's share), the first 30 columns kept as sinks; every one of the
            24 layers is timed and the row reports their mean (min / max beside it)

With DCA (the 7B-1M config, at the longest length): the pattern above drawn once in continuous
distances and split over the parts with one budget per head (the engine's default,
longctx/sparse/estimate.py: columns by key range, distances to intra and successive, the ones
past the successive part folded into inter distances, one in m kept for the m older chunks a
folded line crosses), and, for comparison, per part: every part its own full pattern.

1. Checks first, failing loudly (exit 1): the Triton kernel against its PyTorch reference from
   the same index (plain causal and three DCA parts), and full budgets against dense SDPA.
2. Per-layer attention time at 128K..1M tokens, one prefill of the whole length: dense cuDNN
   SDPA (causal, GQA) against sparse = estimation (last 64 queries vs every key, timed on the
   random data; includes gathering the keys from the cache; scores from the Triton passes, as
   the engine runs them on CUDA; the PyTorch scores' time beside, estimate_torch_ms) + index
   conversion (of the fixed pattern) + kernel. Speedup beside MInference's (DESIGN.md section
   5: 4.7x/21x/44x local, 1.4x/5.5x/10.3x mixed at 128K/512K/1M). cuDNN at 1M runs once
   (about 16 s); --dense-1m extrapolate uses 4x the 512K time instead.
   Beside each row, a lower bound computed from the row's own selections and index
   (`pattern_work`), with the copy bandwidth and cuDNN's dense rate measured in the same call:
     pairs      (row, key) pairs the pattern names, summed over q heads and parts: per row, the
                selected diagonals (absolute distances; inter's in every older chunk) inside
                the part's keys the row sees, plus the columns the index keeps beside its
                slash runs (a column inside a run's key range but on no selected diagonal is
                left out, so pairs never exceeds the pattern's own count)
     key_reads  K/V rows the q heads must bring from memory: per row, one per slash run it
                crosses, plus every selected column once per q head. A row sweeping down a run
                meets one key its predecessor did not, so a band costs one K/V row per row
                however wide it is, and an isolated diagonal one K/V row per (row, diagonal)
                pair, which nothing else reuses: its neighbour rows use other keys, and the q
                heads' patterns differ. (A band's whole window once per row tile is no bound:
                the next tiles find it in L2; for the local pattern at 1M that count is 1.45 TB,
                485 ms of H100 copy, against a kernel that took 356 ms.)
     floor_flops_ms = pairs x 4 D / (cuDNN causal FLOPs / cuDNN time)
     floor_bytes_ms = key_reads x 2 (K, V) x D x 2 bytes / device copy bandwidth (bytes read
                      + written per second of a 2 GiB copy)
     floor_ms = max(floor_flops_ms, floor_bytes_ms) + the row's measured estimation;
     best_speedup = dense_s / floor_ms, the most any kernel could reach with this pattern and
     this estimation; kernel_vs_floor = kernel_ms / max(floor_flops_ms, floor_bytes_ms).
3. Kernel configs (block sizes, stages) at 256K, both patterns.
4. TTFT at 1M (mixed pattern), estimated: 28 x per-layer attention + linear layers (QKV, O,
   MLP of the 7B, measured on a 32K-token chunk) x 32 chunks x 28 layers; and how the chunked
   prefill's attention moves with the chunk length (max_num_batched_tokens): per chunk,
   estimation against every cached key + conversion + kernel, without DCA and with the 7B-1M
   DCA config (one budget over the parts; a chunk crossing a DCA chunk is two segments, each
   estimated from its own last rows, as the engine does).
Timings: CUDA events, median of repeats after a warm-up; random data.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from benchmarks.common import environment, out_dir, write_results  # noqa: E402
from longctx.layers.attention.backend import KVCache  # noqa: E402
from longctx.layers.attention.sparse_backend import sequence_kv  # noqa: E402
from longctx.ops.triton.sparse_estimate import part_scores_triton  # noqa: E402
from longctx.ops.triton.vs_sparse import (  # noqa: E402
    SparseKernelConfig,
    sparse_config,
    vs_sparse_attention,
)
from longctx.sparse.convert import SegmentIndex, convert_indices  # noqa: E402
from longctx.sparse.estimate import (  # noqa: E402
    NO_COLUMN,
    NO_SLASH,
    PartSelection,
    SparsePart,
    compact,
    estimate_indices,
    part_scores,
    segment_parts,
)
from longctx.sparse.reference import sparse_attention_reference  # noqa: E402

# The 7B-1M layout. --dry-run (CPU, Triton interpreter) shrinks these to check the script's
# logic before it costs GPU time; nothing else changes them.
DEVICE = "cuda"
HQ, HKV, D = 28, 4, 128
LAYERS, HIDDEN, INTER = 28, 3584, 18944
DTYPE = torch.bfloat16
SCALE = D**-0.5
PAGE = 64
VERTICAL, SLASH, LAST_Q = 1000, 6096, 64
SINKS = 30
K = 1024
DCA_CHUNK, DCA_LOCAL = 262144, 8192  # Qwen2.5-7B-Instruct-1M dual_chunk_attention_config
MODEL_PATTERN = "benchmarks/results/sparse_cpu/pattern_16k/pattern.safetensors"
CHECK_TOKENS = 8192
MINFERENCE = {128 * K: (4.7, 1.4), 512 * K: (21.0, 5.5), 1024 * K: (44.0, 10.3)}
CUDNN_ANCHOR_S = {128 * K: 0.21, 512 * K: 3.9, 1024 * K: 16.2}
TARGET_VS_MINFERENCE = 1.5  # at 512K and 1M


# ------------------------------------------------------------------------------------------------
# inputs and patterns
# ------------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(DTYPE)


def paged(k: torch.Tensor, v: torch.Tensor, seed: int) -> tuple[KVCache, torch.Tensor]:
    """[L, Hkv, D] keys/values into a cache of 64-token pages through a shuffled block table."""
    n = -(-k.shape[0] // PAGE)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    table = torch.randperm(n + 1, generator=g, device=DEVICE)[:n].contiguous()
    caches = []
    for x in (k, v):
        cache = torch.zeros((n + 1, PAGE, HKV, D), dtype=DTYPE, device=DEVICE)
        cache[table] = F.pad(x, (0, 0, 0, 0, 0, n * PAGE - x.shape[0])).view(n, PAGE, HKV, D)
        caches.append(cache)
    return KVCache(caches[0], caches[1]), table


def distinct(count: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """[HQ, count] distinct random integers in [lo, hi) per head (fewer if the range is short)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    count = min(count, hi - lo)
    return torch.stack(
        [lo + torch.randperm(hi - lo, generator=g, device=DEVICE)[:count] for _ in range(HQ)]
    )


def fixed_pattern(
    kind: str, part: SparsePart, q_start: int, q_end: int, seed: int
) -> PartSelection:
    """The benchmark's fixed pattern (module doc) for one part and the queries [q_start, q_end):
    the part's first 30 columns + random ones; the nearest selection distances the queries
    reach (all of the slash budget for local, 90% for mixed) + the rest spread over the range."""
    lo, hi = part.key_lo, part.key_hi
    sinks = torch.arange(lo, lo + min(SINKS, hi - lo), device=DEVICE).expand(HQ, -1)
    cols = torch.cat([sinks, distinct(VERTICAL - sinks.shape[1], lo + sinks.shape[1], hi, seed)], 1)
    lowest = q_start - lo + part.q_shift - (part.diagonal_width - 1)
    if part.causal:
        lowest = max(lowest, part.q_shift)
    highest = q_end - 1 - lo + part.q_shift
    near = SLASH if kind == "local" else SLASH * 9 // 10
    local = torch.arange(lowest, lowest + near, device=DEVICE).expand(HQ, -1)
    spread = distinct(SLASH - near, lowest + near, max(highest + 1, lowest + near + 1), seed + 1)
    return PartSelection(cols.long(), torch.cat([local, spread], 1).long())


def split_continuous(
    sel: PartSelection, parts: list[SparsePart], q_end: int
) -> list[PartSelection]:
    """A pattern drawn for one causal part [0, q_end) (continuous distances) as DCA parts with
    one budget (module doc)."""
    verticals = [
        compact(
            torch.where(
                (sel.vertical >= p.key_lo) & (sel.vertical < p.key_hi), sel.vertical, NO_COLUMN
            ),
            NO_COLUMN,
        )
        for p in parts
    ]
    line_lo = min(p.key_lo for p in parts if not p.fold)
    reach = q_end - 1 - line_lo  # farthest distance of the line parts (the last row's)
    near = torch.where(sel.slash <= reach, sel.slash, NO_SLASH)
    out = []
    for v, p in zip(verticals, parts, strict=True):
        if not p.fold:
            out.append(PartSelection(v, near))
            continue
        m = p.num_keys // p.fold
        j = (q_end - 1) - sel.slash  # the last row's key on each diagonal
        folded = (q_end - 1 - p.key_lo + p.q_shift) - (j - p.key_lo) % p.fold
        heads = [folded[h][(sel.slash[h] > reach) & (sel.slash[h] != NO_SLASH)].unique()[::m]
                 for h in range(folded.shape[0])]  # fmt: skip
        width = max(1, max(x.numel() for x in heads))
        pad = torch.full((len(heads), width), NO_SLASH, dtype=torch.long, device=DEVICE)
        for h, x in enumerate(heads):
            pad[h, : x.numel()] = x
        out.append(PartSelection(v, pad))
    return out


def dca_selections(
    kind: str, seg, parts: list[SparsePart], shared: bool, seed: int
) -> list[PartSelection]:
    """The fixed pattern for one DCA segment: one budget over the parts, or each its own."""
    if not shared:
        return [
            fixed_pattern(kind, p, seg.q_start, seg.q_end, seed=seed + i)
            for i, p in enumerate(parts)
        ]
    whole = fixed_pattern(kind, SparsePart(0, seg.q_end, causal=True), seg.q_start, seg.q_end, seed)
    return split_continuous(whole, parts, seg.q_end)


def load_model_pattern(path: str) -> dict | None:
    """The captured pattern (module doc), or None when the file is missing."""
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        return dict(
            length=int(meta["length"]),
            vertical=f.get_tensor("vertical").long(),
            slash=f.get_tensor("slash").long(),
        )


def model_selection(pattern: dict, layer: int, length: int) -> PartSelection:
    """One captured layer rescaled to the causal part [0, length) (module doc)."""
    src = pattern["length"]
    heads = [h % pattern["vertical"].shape[1] for h in range(HQ)]
    v, s = pattern["vertical"][layer, heads], pattern["slash"][layer, heads]
    scale = length / src
    wide_v = -(-(VERTICAL - SINKS) // max(1, v.shape[1] - SINKS))
    wide_s = -(-SLASH // s.shape[1])
    cols, dists = [], []
    for h in range(HQ):
        c = v[h][v[h] >= SINKS]
        c = ((c * scale).long()[:, None] + torch.arange(wide_v)).flatten().unique()
        c = c[(c >= SINKS) & (c < length)][: VERTICAL - SINKS]
        cols.append(torch.cat([torch.arange(SINKS), c]))
        d = s[h][s[h] >= 0]
        d = ((d * scale).long()[:, None] + torch.arange(wide_s)).flatten().unique()
        dists.append(d[d < length][:SLASH])

    def pad(xs: list[torch.Tensor], fill: int) -> torch.Tensor:
        out = torch.full((HQ, max(x.numel() for x in xs)), fill, dtype=torch.long)
        for h, x in enumerate(xs):
            out[h, : x.numel()] = x
        return out.to(DEVICE)

    return PartSelection(pad(cols, NO_COLUMN), pad(dists, NO_SLASH))


def keys_per_row(index: SegmentIndex) -> float:
    """Mean keys a query row is scored against (whole tiles and column tiles), summed over the
    parts."""
    tiles = (index.tile_range[..., 1] - index.tile_range[..., 0]).double()
    cols = -(-index.column_count.double() // index.block_n) * index.block_n
    return float((tiles * index.block_n + cols).sum(0).mean())


def pattern_work(sels: list[PartSelection], index: SegmentIndex) -> tuple[float, float]:
    """(pairs, key_reads) of one segment's pattern (module doc), summed over heads and parts."""
    pos = index.q_pos0 + torch.arange(index.num_rows, device=DEVICE)
    m0, m1 = index.block_bounds()
    pairs = key_reads = 0.0
    for i, (sel, part) in enumerate(zip(sels, index.parts, strict=True)):
        heads = sel.slash.shape[0]
        row_hi = pos + 1 if part.causal else torch.full_like(pos, part.key_hi)
        row_hi = row_hi.clamp(max=part.key_hi)
        near = (pos - row_hi + 1).expand(heads, -1).contiguous()  # distances a row sees
        far = (pos - part.key_lo).expand(heads, -1).contiguous()
        shifts = torch.tensor(part.shifts(), device=DEVICE)
        valid = (sel.slash != NO_SLASH)[..., None]
        dist = torch.where(valid, sel.slash[..., None] + shifts, NO_SLASH).flatten(1).sort(1)[0]
        inside = torch.searchsorted(dist, far, right=True) - torch.searchsorted(dist, near)
        pairs += float(inside.sum())
        # runs sorted by distance rising: crossed = starting at or below far, minus ending
        # below near (NO_SLASH padding counts in both)
        lo, hi = index.run_lo[i].flip(1).contiguous(), index.run_hi[i].flip(1).contiguous()
        crossed = torch.searchsorted(lo, far, right=True) - torch.searchsorted(hi, near)
        key_reads += float(crossed.sum()) + float((sel.vertical != NO_COLUMN).sum())
        rows = m1 - m0
        for h in range(heads):  # the columns each block keeps, times the rows that see them
            cols = index.columns[i, h].long()
            used = torch.arange(cols.shape[-1], device=DEVICE) < index.column_count[i, h, :, None]
            seen = (m1[:, None] - cols).clamp(max=rows[:, None]) if part.causal else rows[:, None]
            pairs += float(torch.where(used, seen, 0).sum())
    return pairs, key_reads


def floors(
    pairs: float, key_reads: float, estimate_s: float, dense_s: float, length: int, copy_bw: float
) -> dict:
    """The lower-bound columns (module doc) from a pattern's work and this call's rates."""
    dense_rate = 4 * D * HQ * length * (length + 1) / 2 / dense_s
    flops_s = pairs * 4 * D / dense_rate
    bytes_s = key_reads * 2 * D * DTYPE.itemsize / copy_bw
    floor_s = max(flops_s, bytes_s) + estimate_s
    return dict(
        copy_tbps=copy_bw / 1e12,
        dense_tflops=dense_rate / 1e12,
        floor_flops_ms=flops_s * 1e3,
        floor_bytes_ms=bytes_s * 1e3,
        floor_ms=floor_s * 1e3,
        best_speedup=dense_s / floor_s,
    )


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


class Stopwatch:
    """Marks on the device timeline (CUDA events), or host time elsewhere."""

    def __init__(self) -> None:
        self.marks: list = []

    def mark(self) -> None:
        if DEVICE == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def laps(self) -> list[float]:
        """Seconds between consecutive marks (synchronises)."""
        sync()
        if DEVICE == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def cuda_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        watch = Stopwatch()
        watch.mark()
        fn()
        watch.mark()
        times.extend(watch.laps())
    return sorted(times)[len(times) // 2]


def reps_for(length: int) -> int:
    return 5 if length <= 128 * K else 3 if length <= 512 * K else 2


def dense_fn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool
) -> Callable[[], torch.Tensor]:
    """cuDNN SDPA, causal: native GQA, or K/V expanded to 28 heads where the build refuses it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if not gqa:
        kh, vh = (x.repeat_interleave(HQ // HKV, 1) for x in (kh, vh))
    backend = SDPBackend.CUDNN_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)

    return run


def cudnn_takes_gqa() -> bool:
    q, k = randn(1024, HQ, D, seed=0), randn(1024, HKV, D, seed=0)
    try:
        dense_fn(q, k, k, gqa=True)()
        return True
    except RuntimeError:
        return False


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second (a 2 GiB buffer copied)."""
    n = 2**31 if DEVICE == "cuda" else 2**24
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * n / cuda_seconds(lambda: dst.copy_(src), reps=5)


def kernel_config() -> SparseKernelConfig:
    return sparse_config(D)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# 1. checks
# ------------------------------------------------------------------------------------------------


def run_checks() -> list[dict]:
    """Kernel vs PyTorch reference (same index), full budget vs SDPA. Raises on a mismatch."""
    from longctx.ops.dca import DCASegment

    rows = []
    length = CHECK_TOKENS
    q, k, v = (
        randn(length, HQ, D, seed=1),
        randn(length, HKV, D, seed=2),
        randn(length, HKV, D, seed=3),
    )
    cache, table = paged(k, v, seed=4)
    cfg = kernel_config()
    c = length * 3 // 8  # DCA chunk_len: the last quarter of the queries sees three parts
    dca = SimpleNamespace(chunk_size=length // 2, local_size=length // 2 - c, chunk_len=c)
    cases = [("plain causal", [SparsePart(0, length, causal=True)], 0)]
    seg = DCASegment(chunk=2, q_start=2 * c, q_end=length, chunk_len=c)
    cases.append(("DCA three parts", segment_parts(seg, dca), 2 * c))
    for name, parts, q0 in cases:
        n = length - q0
        qp = torch.stack([randn(n, HQ, D, seed=10 + i) for i in range(len(parts))])
        sels = estimate_indices(
            qp[:, -LAST_Q:],
            k,
            parts,
            length - LAST_Q,
            [VERTICAL // 5] * HQ,
            [SLASH // 8] * HQ,
            scale=SCALE,
        )
        args = (qp[:, -LAST_Q:], k, parts, length - LAST_Q)
        got = part_scores_triton(*args, scale=SCALE)
        want = part_scores(*args, scale=SCALE)
        err = max((a - b).abs().max().item() for a, b in zip(got[0] + got[1], want[0] + want[1]))
        rows.append(dict(check=f"Triton estimation scores vs PyTorch, {name}", max_abs_err=err))
        if not err < 2e-2:
            raise SystemExit(f"CHECK FAILED: {rows[-1]}")
        index = convert_indices(sels, parts, q0, n, block_m=cfg.block_m, block_n=cfg.block_n)
        out, lse = vs_sparse_attention(qp, cache.k, cache.v, table, index, scale=SCALE)
        ref_out, ref_lse = sparse_attention_reference(qp, k, v, index, scale=SCALE)
        err = (out.float() - ref_out.float()).abs().max().item()
        lse_err = (lse - ref_lse).abs().max().item()
        rows.append(dict(check=f"kernel vs reference, {name}", max_abs_err=err, lse_err=lse_err))
        if not (err < 5e-2 and lse_err < 5e-2):
            raise SystemExit(f"CHECK FAILED: {rows[-1]}")
    part = SparsePart(0, length, causal=True)
    full = PartSelection(
        torch.arange(length, device=DEVICE).expand(HQ, -1),
        torch.arange(length, device=DEVICE).expand(HQ, -1),
    )
    index = convert_indices([full], [part], 0, length, block_m=cfg.block_m, block_n=cfg.block_n)
    out, _ = vs_sparse_attention(q[None], cache.k, cache.v, table, index, scale=SCALE)
    want = dense_fn(q, k, v, cudnn_takes_gqa())()[0].transpose(0, 1)
    err = (out.float() - want.float()).abs().max().item()
    rows.append(dict(check="full budget vs cuDNN SDPA", max_abs_err=err))
    if not err < 5e-2:
        raise SystemExit(f"CHECK FAILED: {rows[-1]}")
    return rows


# ------------------------------------------------------------------------------------------------
# 2. per-layer attention, one prefill of the whole length
# ------------------------------------------------------------------------------------------------


def time_estimation(
    q: torch.Tensor, cache: KVCache, table: torch.Tensor, length: int, kernel: bool = True
) -> float:
    """kernel: the Triton scores (the engine's CUDA path), else the PyTorch ones."""
    part = SparsePart(0, length, causal=True)

    def run():
        keys, _ = sequence_kv(cache, table, length, with_values=False)
        return estimate_indices(
            q[None, -LAST_Q:], keys, [part], length - LAST_Q, [VERTICAL] * HQ, [SLASH] * HQ,
            scale=SCALE, kernel=kernel,
        )  # fmt: skip

    return cuda_seconds(run, reps=3)


def sparse_layer(
    q,
    cache,
    table,
    length: int,
    kind: str,
    cfg: SparseKernelConfig,
    reps: int,
    work: bool = False,
    sel: PartSelection | None = None,
) -> dict:
    """Conversion and kernel of one whole-length prefill (the fixed pattern `kind`, or `sel`);
    work: also the pattern's pairs and key reads (pattern_work)."""
    part = SparsePart(0, length, causal=True)
    if sel is None:
        sel = fixed_pattern(kind, part, 0, length, seed=length + len(kind))
    convert = lambda: convert_indices(
        [sel], [part], 0, length, block_m=cfg.block_m, block_n=cfg.block_n
    )
    convert_s = cuda_seconds(convert, reps=2)
    index = convert()
    kernel_s = cuda_seconds(
        lambda: vs_sparse_attention(
            q[None], cache.k, cache.v, table, index, scale=SCALE, config=cfg
        ),
        reps=reps,
    )
    keys = keys_per_row(index)
    res = dict(
        convert_ms=convert_s * 1e3,
        kernel_ms=kernel_s * 1e3,
        keys_per_row=keys,
        kernel_tflops=4 * D * HQ * length * keys / kernel_s / 1e12,
    )
    if work:
        res["pairs"], res["key_reads"] = pattern_work([sel], index)
    return res


def with_floors(res: dict, estimate_s: float, dense_s: float, length: int, copy_bw: float) -> dict:
    """res (sparse_layer / dca_layer) with the lower-bound columns in place of its work counts."""
    out = {k: v for k, v in res.items() if k not in ("pairs", "key_reads")}
    out |= floors(res["pairs"], res["key_reads"], estimate_s, dense_s, length, copy_bw)
    bound_ms = max(out["floor_flops_ms"], out["floor_bytes_ms"])
    return out | dict(kernel_vs_floor=res["kernel_ms"] / bound_ms)


def minference_layer(mi, q, k, v, cache, table, sel, length: int, cfg) -> dict:
    """MInference's converter and kernel (benchmarks/minference_anchor.py) on the same fixed
    pattern, beside ours on the same inputs: times, and how far the two outputs are apart."""
    from benchmarks import minference_anchor as mia

    v_idx, s_idx = mia.indexes(sel.vertical, sel.slash, NO_COLUMN, NO_SLASH)
    convert_s = cuda_seconds(lambda: mia.convert(mi, v_idx, s_idx, length), reps=2)
    index = mia.convert(mi, v_idx, s_idx, length)
    qh = q.transpose(0, 1)[None]
    kh, vh = (x.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None] for x in (k, v))
    run = lambda: mia.attention(mi, qh, kh, vh, index, length)
    kernel_s = cuda_seconds(run, reps=reps_for(length))
    theirs = run()[0].transpose(0, 1)
    part = SparsePart(0, length, causal=True)
    ours_index = convert_indices([sel], [part], 0, length, block_m=cfg.block_m, block_n=cfg.block_n)
    ours, _ = vs_sparse_attention(q[None], cache.k, cache.v, table, ours_index, scale=SCALE,
                                  config=cfg)  # fmt: skip
    diff = (theirs.float() - ours.float()).norm() / ours.float().norm()
    return dict(mi_convert_ms=convert_s * 1e3, mi_kernel_ms=kernel_s * 1e3,
                mi_vs_ours_rel_diff=float(diff))  # fmt: skip


def per_layer(
    lengths: list[int], dense_1m: str, pattern: dict | None, rows: list[dict], flush, mi=None
) -> dict[int, float]:
    cfg = kernel_config()
    gqa = cudnn_takes_gqa()
    copy_bw = copy_bandwidth()
    log(f"device copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    dense_s: dict[int, float] = {}
    for length in lengths:
        log(f"per-layer attention at {length // K}K")
        q = randn(length, HQ, D, seed=length)
        k, v = randn(length, HKV, D, seed=length + 1), randn(length, HKV, D, seed=length + 2)
        cache, table = paged(k, v, seed=length + 3)
        if length >= 1024 * K and dense_1m == "extrapolate" and 512 * K in dense_s:
            dense_s[length] = dense_s[512 * K] * (length / (512 * K)) ** 2
            dense_note = "extrapolated from 512K (x4)"
        else:
            fn = dense_fn(q, k, v, gqa)
            if length >= 1024 * K:  # ~16 s a call: once, no warm-up
                dense_s[length] = cuda_seconds(fn, reps=1, warmup=0)
            else:
                dense_s[length] = cuda_seconds(fn, reps=max(1, reps_for(length) - 1))
            dense_note = "measured"
            del fn
            free()
        mi_rows = {}
        if mi is not None:
            for kind in ("local", "mixed"):
                sel = fixed_pattern(kind, SparsePart(0, length, causal=True), 0, length,
                                    seed=length + len(kind))  # fmt: skip
                mi_rows[kind] = minference_layer(mi, q, k, v, cache, table, sel, length, cfg)
                free()
        del k, v
        est_s = time_estimation(q, cache, table, length)
        est_torch_s = time_estimation(q, cache, table, length, kernel=False)
        log(
            f"  dense {dense_s[length]:.3f} s ({dense_note}), estimation {est_s * 1e3:.1f} ms "
            f"(PyTorch scores {est_torch_s * 1e3:.1f} ms)"
        )
        data = (q, cache, table, length)
        runs: list[tuple[str, Callable[[], dict]]] = [
            (kind, partial(sparse_layer, *data, kind, cfg, reps_for(length), True))
            for kind in ("local", "mixed")
        ]
        if pattern is not None:
            runs.append(("model", partial(model_layer, *data, pattern, cfg)))
        if length == max(lengths) and length > DCA_CHUNK - DCA_LOCAL:
            runs += [
                (f"{kind} DCA" + ("" if shared else " per part"),
                 partial(dca_layer, *data, kind, cfg, shared))
                for shared in (True, False)
                for kind in ("local", "mixed")
            ]  # fmt: skip
        for label, fn in runs:
            try:
                res = fn()
            except torch.cuda.OutOfMemoryError as e:
                rows.append(
                    dict(section="per-layer", tokens=length, pattern=label, error=str(e)[:200])
                )
                free()
                continue
            dca = "DCA" in label
            est_ms = res.pop("estimate_ms") if dca else est_s * 1e3
            total_s = (est_ms + res["convert_ms"] + res["kernel_ms"]) / 1e3
            res = with_floors(res, est_ms / 1e3, dense_s[length], length, copy_bw)
            anchor = (
                None
                if dca or label == "model"
                else MINFERENCE.get(length, (None, None))[0 if label == "local" else 1]
            )
            speedup = dense_s[length] / total_s
            if label in mi_rows:
                res |= mi_rows[label]
                res["speedup_kernel"] = dense_s[length] / (res["kernel_ms"] / 1e3)
                res["minference_speedup_kernel"] = dense_s[length] / (res["mi_kernel_ms"] / 1e3)
                res["vs_minference_kernel"] = res["mi_kernel_ms"] / res["kernel_ms"]
                ours = res["convert_ms"] + res["kernel_ms"]
                res["vs_minference_convert_kernel"] = (
                    res["mi_convert_ms"] + res["mi_kernel_ms"]
                ) / ours
                anchor = (res["mi_convert_ms"] + res["mi_kernel_ms"] + est_ms) / 1e3
                anchor = dense_s[length] / anchor  # measured in this call, same estimation
            rows.append(
                dict(
                    section="per-layer",
                    tokens=length,
                    pattern=label,
                    dense_s=dense_s[length],
                    dense=dense_note + (" (cuDNN causal, no DCA)" if dca else ""),
                    estimate_ms=est_ms,
                    estimate_torch_ms=None if dca else est_torch_s * 1e3,
                    **res,
                    sparse_ms=total_s * 1e3,
                    speedup=speedup,
                    minference_speedup=anchor,
                    vs_minference=speedup / anchor if anchor else None,
                    cudnn_anchor_s=None if dca else CUDNN_ANCHOR_S.get(length),
                )
            )
            log(
                f"  {label}: sparse {total_s * 1e3:.1f} ms (kernel {res['kernel_ms']:.1f}, convert "
                f"{res['convert_ms']:.1f}), {speedup:.1f}x dense"
                + (f", {speedup / anchor:.2f}x MInference's" if anchor else "")
            )
            flush()
        del q, cache, table, data, runs
        free()
    return dense_s


def model_layer(q, cache, table, length: int, pattern: dict, cfg: SparseKernelConfig) -> dict:
    """Every captured layer's pattern rescaled (module doc): the mean conversion, kernel and
    work of one layer, and the fastest and slowest layer (conversion + kernel)."""
    reps = 2 if length < 512 * K else 1
    per = []
    for layer in range(pattern["vertical"].shape[0]):
        sel = model_selection(pattern, layer, length)
        per.append(sparse_layer(q, cache, table, length, "model", cfg, reps, True, sel))
    keys = ("convert_ms", "kernel_ms", "keys_per_row", "pairs", "key_reads")
    mean = {k: sum(r[k] for r in per) / len(per) for k in keys}
    layer_ms = [r["convert_ms"] + r["kernel_ms"] for r in per]
    mean["kernel_tflops"] = 4 * D * HQ * length * mean["keys_per_row"] / mean["kernel_ms"] / 1e9
    return mean | dict(layers=len(per), layer_ms_min=min(layer_ms), layer_ms_max=max(layer_ms))


def dca_layer(
    q, cache, table, length: int, kind: str, cfg: SparseKernelConfig, shared: bool
) -> dict:
    """One layer with the 7B-1M DCA config (C=262144, W=8192): per DCA segment, estimation,
    conversion and kernel over its parts (intra, successive, inter), one budget over the parts
    or the full budget in each (`shared`, module doc). The same random queries stand in for
    every part's rotation. Second pass timed (the first compiles the three-part kernel)."""
    from longctx.ops.dca import dca_segments

    dca = SimpleNamespace(
        chunk_size=DCA_CHUNK, local_size=DCA_LOCAL, chunk_len=DCA_CHUNK - DCA_LOCAL
    )
    segs = []
    for seg in dca_segments(0, length, dca.chunk_len):
        parts = segment_parts(seg, dca)
        sels = dca_selections(kind, seg, parts, shared, seed=seg.q_start)
        segs.append((seg, parts, sels))

    def run() -> dict:
        watch = Stopwatch()
        watch.mark()
        keys, _ = sequence_kv(cache, table, length, with_values=False)
        laps = dict(estimate=0.0, convert=0.0, kernel=0.0)
        keys_sum = pairs = key_reads = 0.0
        for seg, parts, sels in segs:
            qp = q[None, seg.q_start : seg.q_end].expand(len(parts), -1, -1, -1)
            estimate_indices(
                qp[:, -LAST_Q:], keys[: seg.q_end], parts, seg.q_end - LAST_Q,
                [VERTICAL] * HQ, [SLASH] * HQ, scale=SCALE, shared_budget=shared, kernel=True,
            )  # fmt: skip
            watch.mark()
            index = convert_indices(
                sels, parts, seg.q_start, seg.q_end - seg.q_start,
                block_m=cfg.block_m, block_n=cfg.block_n,
            )  # fmt: skip
            watch.mark()
            vs_sparse_attention(qp, cache.k, cache.v, table, index, scale=SCALE, config=cfg)
            watch.mark()
            keys_sum += keys_per_row(index) * (seg.q_end - seg.q_start)
            work = pattern_work(sels, index)
            pairs, key_reads = pairs + work[0], key_reads + work[1]
            watch.mark()  # the counting above is a lap of its own, timed nowhere
        lap = watch.laps()
        for i in range(len(segs)):
            laps["estimate"] += lap[4 * i]
            laps["convert"] += lap[4 * i + 1]
            laps["kernel"] += lap[4 * i + 2]
        return laps | dict(keys_per_row=keys_sum / length, pairs=pairs, key_reads=key_reads)

    run()
    laps = run()
    return dict(
        estimate_ms=laps["estimate"] * 1e3,
        convert_ms=laps["convert"] * 1e3,
        kernel_ms=laps["kernel"] * 1e3,
        keys_per_row=laps["keys_per_row"],
        kernel_tflops=4 * D * HQ * length * laps["keys_per_row"] / laps["kernel"] / 1e12,
        pairs=laps["pairs"],
        key_reads=laps["key_reads"],
    )


# ------------------------------------------------------------------------------------------------
# 3. kernel configs
# ------------------------------------------------------------------------------------------------

TUNE_CONFIGS = [
    SparseKernelConfig(64, 64, 4, 2),
    SparseKernelConfig(64, 64, 4, 3),
    SparseKernelConfig(64, 64, 8, 2),
    SparseKernelConfig(128, 64, 8, 2),
    SparseKernelConfig(64, 32, 4, 3),
]


def tune(length: int, rows: list[dict], flush) -> None:
    log(f"kernel configs at {length // K}K")
    q = randn(length, HQ, D, seed=5)
    cache, table = paged(randn(length, HKV, D, seed=6), randn(length, HKV, D, seed=7), seed=8)
    for cfg in TUNE_CONFIGS:
        for kind in ("local", "mixed"):
            try:
                res = sparse_layer(q, cache, table, length, kind, cfg, reps=3)
            except Exception as e:  # a config that cannot launch is a result too
                res = dict(error=f"{type(e).__name__}: {e}"[:200])
            rows.append(
                dict(section="configs", tokens=length, pattern=kind, config=str(cfg), **res)
            )
            log(f"  {cfg} {kind}: {res.get('kernel_ms', res.get('error'))}")
            flush()
    del q, cache, table
    free()


# ------------------------------------------------------------------------------------------------
# 4. TTFT estimate and the chunk length
# ------------------------------------------------------------------------------------------------


def linear_seconds(tokens: int) -> float:
    """QKV (with bias), O and SwiGLU MLP of one 7B layer on `tokens` tokens."""
    hidden, inter = HIDDEN, INTER
    w = lambda o, i, s: randn(o, i, seed=s) * 0.02
    qkv, qkv_b = w(hidden + 2 * HKV * D, hidden, 1), randn(hidden + 2 * HKV * D, seed=2)
    o, gate_up, down = w(hidden, hidden, 3), w(2 * inter, hidden, 4), w(hidden, inter, 5)
    x = randn(tokens, hidden, seed=6)

    def run():
        a = F.linear(x, qkv, qkv_b)
        y = F.linear(a[:, :hidden], o)
        gu = F.linear(y, gate_up)
        return F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], down)

    return cuda_seconds(run, reps=5)


def chunked_layer(length: int, chunk: int, kind: str, cfg: SparseKernelConfig, dca: bool) -> dict:
    """One layer's attention over a chunked prefill of `length` tokens: per chunk (per DCA
    segment of the chunk, with the 7B-1M config and one budget over the parts, when `dca`),
    estimation (last 64 queries vs every cached key) + conversion + kernel. Patterns drawn up
    front."""
    from longctx.ops.dca import dca_segments

    q = randn(length, HQ, D, seed=11)
    cache, table = paged(randn(length, HKV, D, seed=12), randn(length, HKV, D, seed=13), seed=14)
    config = SimpleNamespace(
        chunk_size=DCA_CHUNK, local_size=DCA_LOCAL, chunk_len=DCA_CHUNK - DCA_LOCAL
    )
    steps = []
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        for seg in dca_segments(s, e, config.chunk_len if dca else e):
            parts = segment_parts(seg, config if dca else None)
            sels = dca_selections(kind, seg, parts, shared=True, seed=seg.q_end)
            steps.append((seg, parts, sels))
    timing = dict(estimate=0.0, convert=0.0, kernel=0.0)

    def step(seg, parts, sels) -> None:
        s, e = seg.q_start, seg.q_end
        qp = q[None, s:e].expand(len(parts), -1, -1, -1)
        watch = Stopwatch()
        watch.mark()
        keys, _ = sequence_kv(cache, table, e, with_values=False)
        estimate_indices(
            qp[:, -LAST_Q:], keys, parts, e - LAST_Q, [VERTICAL] * HQ, [SLASH] * HQ,
            scale=SCALE, kernel=True,
        )  # fmt: skip
        watch.mark()
        index = convert_indices(sels, parts, s, e - s, block_m=cfg.block_m, block_n=cfg.block_n)
        watch.mark()
        vs_sparse_attention(qp, cache.k, cache.v, table, index, scale=SCALE, config=cfg)
        watch.mark()
        for name, lap in zip(timing, watch.laps()):
            timing[name] += lap

    # One untimed step per part count first: the kernel compiles per count (2 and 3 with DCA).
    for args in {len(parts): (seg, parts, sels) for seg, parts, sels in steps}.values():
        step(*args)
    timing.update(dict.fromkeys(timing, 0.0))
    for args in steps:
        step(*args)
    return {f"{k}_s": v for k, v in timing.items()} | {"attention_s": sum(timing.values())}


def ttft(length: int, chunks: list[int], one_shot: dict[str, float], rows, flush) -> None:
    """one_shot: pattern -> per-layer attention seconds of a one-shot prefill (section 2)."""
    cfg = kernel_config()
    lin32 = linear_seconds(32 * K)
    linear_total = lin32 * (length / (32 * K)) * LAYERS
    log(f"linear layers: {lin32 * 1e3:.1f} ms per 32K chunk per layer -> {linear_total:.1f} s")
    for pattern, attention_s in one_shot.items():
        est = LAYERS * attention_s + linear_total
        rows.append(
            dict(
                section="ttft",
                tokens=length,
                pattern=pattern,
                chunk="whole prompt",
                attention_per_layer_s=attention_s,
                linear_s=linear_total,
                ttft_estimate_s=est,
                target_s=45.0,
            )
        )
        log(f"TTFT estimate ({pattern}, one-shot attention) {est:.1f} s")
        flush()
    for dca, chunk in [(dca, chunk) for dca in (False, True) for chunk in chunks]:
        pattern = "mixed DCA" if dca else "mixed"
        log(f"chunked prefill, {pattern}, chunk {chunk // K}K")
        try:
            res = chunked_layer(length, chunk, "mixed", cfg, dca)
        except torch.cuda.OutOfMemoryError as e:
            rows.append(
                dict(
                    section="ttft", tokens=length, pattern=pattern, chunk=chunk, error=str(e)[:200]
                )
            )
            free()
            continue
        est = LAYERS * res["attention_s"] + linear_total
        rows.append(
            dict(
                section="ttft",
                tokens=length,
                pattern=pattern,
                chunk=chunk,
                attention_per_layer_s=res["attention_s"],
                **res,
                linear_s=linear_total,
                ttft_estimate_s=est,
                target_s=45.0,
            )
        )
        log(f"  attention {res['attention_s']:.3f} s per layer -> TTFT estimate {est:.1f} s")
        flush()


# ------------------------------------------------------------------------------------------------


SECTIONS = [
    ("per-layer", "sparse_gpu", "Per-layer attention, one prefill of the whole length."),
    ("configs", "sparse_gpu_configs", "Kernel configs (block_m, block_n, warps, stages)."),
    (
        "ttft",
        "sparse_gpu_ttft",
        "TTFT estimate = 28 x attention per layer + linear layers (measured on 32K tokens, "
        "scaled to the length); chunk = prefill chunk length (max_num_batched_tokens), "
        "attention per layer summed over the chunks (estimation per chunk against every "
        "cached key).",
    ),
]


def shrink_for_dry_run() -> None:
    global DEVICE, HQ, HKV, D, LAYERS, HIDDEN, INTER, PAGE, VERTICAL, SLASH, LAST_Q, K, SCALE
    global TUNE_CONFIGS, CHECK_TOKENS, DCA_CHUNK, DCA_LOCAL
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 (set before the kernels load)")
    DEVICE, HQ, HKV, D, LAYERS, HIDDEN, INTER = "cpu", 4, 2, 32, 2, 64, 128
    PAGE, VERTICAL, SLASH, LAST_Q, K, SCALE = 16, 40, 100, 16, 4, 32**-0.5
    CHECK_TOKENS = 256
    DCA_CHUNK, DCA_LOCAL = 256, 64
    TUNE_CONFIGS = [SparseKernelConfig(32, 32, 4, 1), SparseKernelConfig(64, 32, 4, 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="128K only, short chunk sweep")
    p.add_argument("--dense-1m", choices=["measure", "extrapolate"], default="measure")
    p.add_argument("--skip-configs", action="store_true")
    p.add_argument(
        "--lengths",
        type=lambda x: [int(n) for n in x.split(",")],
        help="per-layer lengths in K tokens, comma-separated (default 128,256,512,1024; "
        "--quick 128); the DCA rows run at the longest",
    )
    p.add_argument("--skip-ttft", action="store_true", help="no TTFT estimate / chunk sweep")
    p.add_argument(
        "--model-pattern",
        default=MODEL_PATTERN,
        help="captured pattern for the model rows (benchmarks/capture_pattern_cpu.py)",
    )
    p.add_argument(
        "--minference",
        default=None,
        metavar="PATH",
        help="a checkout of microsoft/MInference: its CUDA converter and Triton kernel run "
        "beside ours on the local and mixed patterns (benchmarks/minference_anchor.py)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, times nothing",
    )
    args = p.parse_args()
    if args.dry_run:
        shrink_for_dry_run()
        args.quick = True
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    start = time.time()
    env = environment()
    out = out_dir(args.out)
    rows: list[dict] = []
    notes = (
        "7B-1M head layout (28 q / 4 kv, d=128, bf16), paged cache (64-token pages, shuffled). "
        "Fixed patterns at 1000 vertical / 6096 slash per head: local = 30 sinks + 970 random "
        "columns, the 6096 nearest diagonals; mixed = same columns, 90% nearest diagonals + 10% "
        "spread uniformly; model = the default model's own selections at 16K on real text, "
        "rescaled (mean of its 24 layers); DCA rows: one budget over the parts, or per part. "
        "sparse_ms = estimation (last 64 queries, random data, incl. key "
        "gather) + conversion + kernel. Dense = cuDNN SDPA causal. MInference anchors from "
        "DESIGN.md section 5. keys_per_row and kernel_tflops count the whole tiles the kernel "
        "computes, all DCA parts together. With --minference, minference_speedup is measured "
        "in this call (their converter + kernel + our estimation) and mi_* / vs_minference_* "
        "compare their converter and kernel with ours on the same pattern and inputs. "
        "Lower bounds (floor_*, best_speedup, "
        "kernel_vs_floor): the script's docstring; copy_tbps and dense_tflops are this call's."
    )

    def flush() -> None:
        wall = env | {"wall_s": round(time.time() - start)}
        for section, name, note in SECTIONS:
            part = [{k: v for k, v in r.items() if k != "section"} for r in rows]
            part = [r for r, full in zip(part, rows) if full.get("section") == section]
            if part:
                write_results(out, name, wall, part, notes + " " + note)

    checks = run_checks()
    write_results(out, "sparse_gpu_checks", env, checks, "All checks passed.")
    default = [128] if args.quick else [128, 256, 512, 1024]
    lengths = [n * K for n in args.lengths or default]
    pattern = load_model_pattern(args.model_pattern)
    if pattern is None:
        log(f"no captured pattern at {args.model_pattern}: the model rows are skipped")
    mi = None
    if args.minference:
        from benchmarks import minference_anchor

        mi = minference_anchor.load(args.minference)
        log(f"MInference anchor built from {args.minference} (commit {mi.commit})")
        env["minference_commit"] = mi.commit
    per_layer(lengths, args.dense_1m, pattern, rows, flush, mi)
    if (args.dry_run or not args.quick) and not args.skip_configs:
        tune(256 * K, rows, flush)
    if args.skip_ttft:
        flush()
        log(f"done in {time.time() - start:.0f} s")
        return
    length = max(lengths)
    one_shot = {
        r["pattern"]: r["sparse_ms"] / 1e3
        for r in rows
        if r.get("section") == "per-layer"
        and r["tokens"] == length
        and r["pattern"].startswith("mixed")
        and "sparse_ms" in r
    }
    chunks = [16 * K, 32 * K] if args.quick else [32 * K, 64 * K, 128 * K, 256 * K]
    ttft(length, chunks, one_shot, rows, flush)
    flush()
    log(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
