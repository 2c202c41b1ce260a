"""Command-line flags shared by every subcommand that builds an engine (generate, eval, serve)."""

from __future__ import annotations

import argparse
from typing import Any

from longctx.config import DCAConfig
from longctx.errors import ConfigError
from longctx.sparse.config import DCA_BUDGETS, SLASH_UNITS, SparseConfig, resolve_sparse_config


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory or .gguf file (default: the built-in "
        "Qwen2.5-Coder-0.5B-Instruct GGUF, fetched on first use)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode eagerly (no CUDA graphs); for debugging",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="queue step t+1 on the device before waiting for step t, hiding scheduling and "
        "detokenization behind the GPU (default: on for CUDA, off for CPU)",
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights for the architecture of --model (a model directory, a config.json, "
        "or qwen2.5-7b-instruct-1m / qwen2.5-14b-instruct-1m): for speed measurements",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "fp8_e4m3"],
        help="KV-cache storage: auto (the compute dtype) or fp8 (= fp8_e4m3: e4m3 values with a "
        "float32 scale per token and kv head; half the memory, twice the context)",
    )
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit in tokens, prompt plus output (default: the model's)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per forward pass; long prompts are prefilled in chunks of this "
        "size (default: 4096 on CPU, 32768 on GPU)",
    )
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded at once")
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache size in GiB (default: 4 on CPU; on GPU a share of free memory)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of GPU memory the engine may use (weights, activations, cache)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per KV-cache block (default: 128 on CUDA, 64 on the CPU, halved until it "
        "divides the DCA chunk length)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not share computed KV blocks between requests whose prompts start alike "
        "(prefix caching is on by default)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        help="attention implementation: auto, torch, dca, triton, sparse, ... (default: auto)",
    )
    pp = p.add_argument_group(
        "pipeline parallelism (one host: the engine starts its stage processes; several hosts: "
        "start every rank with torchrun, see README)"
    )
    pp.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        help="stages, one device (or CPU process) each; layers are split by cost",
    )
    pp.add_argument(
        "--pipeline-chunking",
        choices=["dcpp", "fixed"],
        default="dcpp",
        help="prefill chunk lengths under pipeline parallelism: dcpp (equal modelled cost, "
        "default) or fixed (--max-num-batched-tokens each)",
    )
    pp.add_argument(
        "--pipeline-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="fail the engine when a stage answers no micro-batch for this long",
    )
    d = p.add_argument_group(
        "Dual Chunk Attention (length extrapolation; on by default for models whose config has "
        "dual_chunk_attention_config)"
    )
    d.add_argument(
        "--dca-chunk-size",
        type=int,
        default=None,
        help="DCA chunk size C (at most the trained context), turns DCA on",
    )
    d.add_argument(
        "--dca-local-size",
        type=int,
        default=None,
        help="DCA local window W (< C); chunk length is C - W",
    )
    d.add_argument(
        "--dca-original-max-position",
        type=int,
        default=None,
        help="trained context length, for YaRN attention scaling (default: the DCA chunk size)",
    )
    s = p.add_argument_group(
        "sparse prefill (MInference vertical-slash; on by default for model directories with "
        "sparse_attention_config.json)"
    )
    s.add_argument(
        "--sparse-config",
        default=None,
        metavar="PATH",
        help="per-head pattern file (MInference format), or 'default' for 1000 vertical / "
        "6096 slash per head",
    )
    s.add_argument("--no-sparse", action="store_true", help="dense prefill at every length")
    s.add_argument(
        "--sparse-threshold",
        type=int,
        default=None,
        help="prefill chunks go sparse once the sequence's cached length passes this "
        "(default 32768)",
    )
    s.add_argument(
        "--sparse-last-q",
        type=int,
        default=None,
        help="queries per chunk that estimate the pattern (default 64)",
    )
    s.add_argument(
        "--sparse-dca-budget",
        choices=DCA_BUDGETS,
        default=None,
        help="with DCA, spend each head's budget once over all key parts (shared, default) or "
        "in each part (per_part: up to 3x the keys)",
    )
    s.add_argument(
        "--sparse-slash-unit",
        choices=SLASH_UNITS,
        default=None,
        help="what a slash budget counts: keys per row in whole kernel tiles (tile, default) "
        "or MInference's diagonals, however spread (diagonal)",
    )


def sparse_from_args(args: argparse.Namespace) -> SparseConfig | bool | None:
    """False (--no-sparse), a SparseConfig, or None: nothing found (the LLM then stays dense)."""
    if args.no_sparse:
        if args.sparse_config is not None:
            raise ConfigError("--no-sparse and --sparse-config exclude each other")
        return False
    return resolve_sparse_config(
        args.sparse_config,
        args.model,
        threshold=args.sparse_threshold,
        last_q=args.sparse_last_q,
        dca_budget=args.sparse_dca_budget,
        slash_unit=args.sparse_slash_unit,
    )


def dca_from_args(args: argparse.Namespace) -> DCAConfig | None:
    if args.dca_chunk_size is None and args.dca_local_size is None:
        if args.dca_original_max_position is not None:
            raise ConfigError(
                "--dca-original-max-position needs --dca-chunk-size and --dca-local-size"
            )
        return None
    if args.dca_chunk_size is None or args.dca_local_size is None:
        raise ConfigError("DCA needs both --dca-chunk-size and --dca-local-size")
    return DCAConfig(
        chunk_size=args.dca_chunk_size,
        local_size=args.dca_local_size,
        original_max_position_embeddings=args.dca_original_max_position or args.dca_chunk_size,
    )


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for longctx.LLM from the parsed flags."""
    return dict(
        model=args.model,
        random_weights=args.random_weights,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        dca=dca_from_args(args),
        sparse=sparse_from_args(args),
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        attention_backend=args.attention_backend,
        enable_prefix_caching=not args.no_prefix_caching,
        pipeline_parallel_size=args.pipeline_parallel_size,
        pipeline_chunking=args.pipeline_chunking,
        pipeline_timeout_s=args.pipeline_timeout,
    )
