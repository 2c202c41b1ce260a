"""Which decoder layers each pipeline stage runs: contiguous ranges of about equal cost.

Stage 0 (the engine's own process) also holds the embedding and the LM head: sampling happens
where the requests' random generators live, so the last stage sends the rows to sample back
to stage 0 instead of logits. Those two count in stage 0's cost, so it takes fewer layers
when they weigh (a small model's LM head is several layers' worth of weights).

A unit's cost is a roofline estimate for a reference micro-batch, max(FLOPs, bytes x machine
balance): a prefill chunk's layers are FLOP-bound, the LM head (one sampled row per sequence)
is bound by reading its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.config import ModelConfig
from longctx.errors import ConfigError

# FLOPs per byte of memory traffic at which compute and bandwidth take equally long
# (H100: ~990 dense bf16 TFLOP/s over ~3.35 TB/s).
DEFAULT_FLOPS_PER_BYTE = 300.0


@dataclass(frozen=True)
class StageWorkload:
    """The micro-batch the split balances: tokens, rows sampled, keys each row attends to."""

    tokens: int
    sampled_rows: int = 1
    context: int = 0  # mean keys per query row; 0: causal within the chunk
    bytes_per_param: int = 2
    flops_per_byte: float = DEFAULT_FLOPS_PER_BYTE


def layer_cost(config: ModelConfig, work: StageWorkload) -> float:
    h = config.hidden_size
    params = h * (config.q_size + 2 * config.kv_size) + config.q_size * h
    params += 3 * h * config.intermediate_size
    keys = work.context or (work.tokens + 1) / 2
    flops = 2.0 * params * work.tokens + 4.0 * config.q_size * keys * work.tokens
    return max(flops, params * work.bytes_per_param * work.flops_per_byte)


def ends_cost(config: ModelConfig, work: StageWorkload) -> float:
    """The embedding (a row lookup per token) and the LM head, both on stage 0."""
    h, vocab, bpp = config.hidden_size, config.vocab_size, work.bytes_per_param
    embed = work.tokens * h * bpp * work.flops_per_byte
    head = max(2.0 * work.sampled_rows * h * vocab, h * vocab * bpp * work.flops_per_byte)
    return embed + head


def partition_layers(
    config: ModelConfig, num_stages: int, work: StageWorkload
) -> tuple[range, ...]:
    """Contiguous layer ranges, one per stage (each non-empty), minimising the dearest stage."""
    n = config.num_layers
    if num_stages > n:
        raise ConfigError(
            f"pipeline_parallel_size {num_stages} exceeds the model's {n} layers: every stage "
            "needs at least one layer"
        )
    unit = layer_cost(config, work)
    extra = [ends_cost(config, work)] + [0.0] * (num_stages - 1)
    return _min_max_split([unit] * n, extra)


def _min_max_split(costs: list[float], extra: list[float]) -> tuple[range, ...]:
    """Split costs into len(extra) contiguous non-empty ranges; stage s also costs extra[s].
    Dynamic programming over (stages used, layers covered)."""
    n, stages = len(costs), len(extra)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the least possible dearest stage when stages 0..s-1 cover layers 0..i-1
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], extra[s - 1] + prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(stages, 0, -1):
        bounds.append(range(cut[s][i], i))
        i = cut[s][i]
    return tuple(reversed(bounds))
