from longctx.config import ModelConfig
from longctx.errors import ConfigError
from longctx.layers.attention.backend import AttentionBackend
from longctx.layers.attention.dca_backend import DCAAttentionBackend
from longctx.layers.attention.torch_backend import TorchAttentionBackend

BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttentionBackend,
    "dca": DCAAttentionBackend,
}


def make_backend(name: str, config: ModelConfig, device_type: str) -> AttentionBackend:
    """'auto' picks the fastest backend available for the device and the model's settings."""
    if name == "auto":
        name = "dca" if config.dca is not None else "torch"
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r} (available: {', '.join(BACKENDS)})")
    return BACKENDS[name](config)
