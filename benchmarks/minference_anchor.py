"""MInference's own vertical-slash kernel as a benchmark anchor, run from a checkout of
microsoft/MInference that is never committed here (`--minference PATH` of bench_sparse_gpu.py).

What runs is theirs, unchanged: the CUDA index converter (csrc/vertical_slash_index.cu, built
with torch.utils.cpp_extension for the GPU at hand) and the Triton kernel of
minference/ops/pit_sparse_flash_attention_v2.py (`_triton_mixed_sparse_attention`), loaded as
a module without importing their package (which pulls in their model patching). Their layout:
q, k, v [1, H, N, D] with one K/V head per query head (GQA repeated), vertical indices sorted
ascending and slash indices (distances) sorted descending, [1, H, count] int32. Their kernel
indexes with 32-bit offsets, so it runs in launches of at most 16 heads (28 heads x 1M x 128
overflow).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADS = 16  # per launch of their kernel


@dataclass(frozen=True)
class MInference:
    convert: object  # (seqlens, v_idx, s_idx, context, block_m, block_n) -> 4 tensors
    attention: object  # their _triton_mixed_sparse_attention
    commit: str


def load(path: str) -> MInference:
    root = Path(path)
    sources = [root / "csrc" / "kernels.cpp", root / "csrc" / "vertical_slash_index.cu"]
    kernel_file = root / "minference" / "ops" / "pit_sparse_flash_attention_v2.py"
    for f in [*sources, kernel_file]:
        if not f.is_file():
            raise SystemExit(f"minference anchor: {f} not found (pass a MInference checkout)")
    from torch.utils.cpp_extension import load as build

    major, minor = torch.cuda.get_device_capability()
    ext = build(
        name="minference_vs_index",
        sources=[str(s) for s in sources],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
        verbose=False,
    )
    attention = _load_kernel(kernel_file, ext.convert_vertical_slash_indexes)
    commit = (root / "COMMIT").read_text().strip() if (root / "COMMIT").is_file() else "unknown"
    return MInference(ext.convert_vertical_slash_indexes, attention, commit)


def _load_kernel(kernel_file: Path, convert) -> object:
    """Their kernel module under a stand-in package whose `cuda` holds the built converter."""
    pkg, ops, cuda = (types.ModuleType(n) for n in ("mi_peer", "mi_peer.ops", "mi_peer.cuda"))
    pkg.__path__, ops.__path__ = [], []
    cuda.convert_vertical_slash_indexes = convert
    sys.modules.update({"mi_peer": pkg, "mi_peer.ops": ops, "mi_peer.cuda": cuda})
    spec = importlib.util.spec_from_file_location("mi_peer.ops.pit_v2", kernel_file)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "mi_peer.ops"
    spec.loader.exec_module(mod)
    return mod._triton_mixed_sparse_attention


def indexes(vertical: torch.Tensor, slash: torch.Tensor, pad_col: int, pad_slash: int):
    """Our selection of one causal part (vertical [H, V] key columns, slash [H, S] distances,
    padded) in their form: [1, H, V] ascending and [1, H, S] descending int32, padding moved
    out of reach (columns past the sequence, distances below zero are never reached)."""
    big = torch.iinfo(torch.int32).max // 2
    v = torch.where(vertical == pad_col, big, vertical).int().sort(dim=-1).values
    s = torch.where(slash == pad_slash, -1, slash).int().sort(dim=-1, descending=True).values
    return v[None].contiguous(), s[None].contiguous()


def convert(mi: MInference, v_idx, s_idx, length: int, block: int = 64):
    """Their converter, MAX_HEADS heads a launch: its block_offset [1, H, rows, NNZ_S] is
    indexed in 32 bits too (28 heads x 16K rows x 6096 at 1M overflow: an illegal address,
    seen on an H200, 2026-12-02)."""
    seqlens = torch.tensor([length], dtype=torch.int32, device=v_idx.device)
    parts = [
        mi.convert(seqlens, v_idx[:, h0 : h0 + MAX_HEADS].contiguous(),
                   s_idx[:, h0 : h0 + MAX_HEADS].contiguous(), length, block, block)
        for h0 in range(0, v_idx.shape[1], MAX_HEADS)
    ]  # fmt: skip
    return [torch.cat([p[i] for p in parts], 1) for i in range(4)]


def attention(mi: MInference, q, k, v, index, length: int, block: int = 64) -> torch.Tensor:
    """q [1, Hq, N, D], k/v [1, Hq, N, D] (GQA repeated), index from `convert`; launches of at
    most MAX_HEADS heads. Returns out [1, Hq, N, D]."""
    count, offset, col_count, col_index = index
    seqlens = torch.tensor([length], dtype=torch.int32, device=q.device)
    outs = []
    for h0 in range(0, q.shape[1], MAX_HEADS):
        h1 = min(h0 + MAX_HEADS, q.shape[1])
        part = [t[:, h0:h1].contiguous() for t in (count, offset, col_count, col_index)]
        outs.append(
            mi.attention(
                q[:, h0:h1],
                k[:, h0:h1],
                v[:, h0:h1],
                seqlens,
                *part,
                q.shape[-1] ** -0.5,
                block,
                block,
            )  # fmt: skip
        )
    return torch.cat(outs, 1)
