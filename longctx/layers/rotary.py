"""Rotary position embedding (RoPE), rotate-half layout as in Qwen2 / Llama checkpoints."""

import torch


class RotaryEmbedding:
    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim // 2] in float32 for integer positions [T].

        Computed per call rather than cached: at 1M positions a table would cost more memory
        than the few flops it saves, and DCA asks for positions no table would hold.
        """
        exponents = (
            torch.arange(0, self.head_dim, 2, device=positions.device).float() / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, H, D] by positions [T] (backends precompute cos/sin once per step)."""
        cos, sin = self.cos_sin(positions)
        return apply_rotary(x, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
