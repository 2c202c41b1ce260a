"""Triton attention kernels: paged flash prefill (dense, DCA, YaRN) and split-K paged decode.

flash_prefill / flash_prefill_varlen: queries [T, Hq, D] against keys in the paged cache
(or contiguous fresh keys), bottom-right causal or a key range, optional in-kernel RoPE,
DCA and YaRN (on sm_90 the dense part runs the warp-specialized Gluon kernel of
flash_prefill_ws.py). paged_decode: one query per sequence, split-K over the paged cache.
All return (out, lse) with lse [Hq, tokens] float32 natural log, as longctx/ops/attention.py.
"""

from longctx.ops.triton.flash_prefill import (
    LARGE_PAGE_PREFILL_CONFIGS,
    PREFILL_CONFIGS,
    KernelConfig,
    flash_prefill,
    flash_prefill_varlen,
    prefill_config,
    rope_inv_freq,
)
from longctx.ops.triton.paged_decode import DECODE_CONFIGS, DecodeConfig, paged_decode

__all__ = [
    "DECODE_CONFIGS",
    "LARGE_PAGE_PREFILL_CONFIGS",
    "PREFILL_CONFIGS",
    "DecodeConfig",
    "KernelConfig",
    "flash_prefill",
    "flash_prefill_varlen",
    "paged_decode",
    "prefill_config",
    "rope_inv_freq",
]
