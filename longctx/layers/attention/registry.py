from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers.attention.backend import AttentionBackend
from longctx.layers.attention.clamped_rope_backend import ClampedRopeBackend
from longctx.layers.attention.dca_backend import DCAAttentionBackend
from longctx.layers.attention.sparse_backend import SparseAttentionBackend
from longctx.layers.attention.torch_backend import TorchAttentionBackend
from longctx.sparse.config import SparseConfig

BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "dca": DCAAttentionBackend,
    "rope-clamp": ClampedRopeBackend,  # evaluation baseline: positions held at the trained limit
}


def _triton_backend() -> type[AttentionBackend]:
    # Imported on demand: CPU installs need not have triton.
    from longctx.layers.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend


_LAZY: dict[str, object] = {"triton": _triton_backend}


def triton_head_dims() -> frozenset[int]:
    """Head sizes the Triton kernels have configs for."""
    from longctx.ops.triton.flash_prefill import PREFILL_CONFIGS
    from longctx.ops.triton.paged_decode import DECODE_CONFIGS

    return frozenset(PREFILL_CONFIGS) & frozenset(DECODE_CONFIGS)


def make_backend(
    name: str, config: ModelConfig, device_type: str, sparse: SparseConfig | None = None
) -> AttentionBackend:
    """'auto' picks the fastest backend available for the device and the model's settings:
    the Triton kernels on CUDA (for the head sizes they support), the PyTorch DCA or plain
    backend elsewhere -- wrapped in
    sparse prefill when a sparse config is given ('sparse' forces it, default budgets if
    none). A dense backend named explicitly runs dense."""
    if name == "sparse" or (name == "auto" and sparse is not None):
        dense = make_backend("auto", config, device_type)
        return SparseAttentionBackend(config, sparse or SparseConfig(), dense)
    if name == "auto":
        if device_type == "cuda" and config.head_dim in triton_head_dims():
            name = "triton"
        else:  # the PyTorch backends run any head size
            name = "dca" if config.dca is not None else "torch"
    if name == "triton" and config.head_dim not in triton_head_dims():
        raise ConfigError(
            f"the triton attention backend has no kernels for head_dim {config.head_dim} "
            f"(supported: {sorted(triton_head_dims())}); use --attention-backend torch"
        )
    if name in _LAZY:
        return _LAZY[name]()(config)
    if name not in BACKENDS:
        known = ", ".join([*BACKENDS, *_LAZY, "sparse"])
        raise ConfigError(f"unknown attention backend {name!r} (available: {known})")
    return BACKENDS[name](config)
