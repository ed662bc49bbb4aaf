"""Rotary position embedding on the decoupled rope channels, with YaRN context extension.

DeepSeek's checkpoints store the `qk_rope_head_dim` rope channels as consecutive pairs
(x[2i], x[2i+1]) = one rotation plane rotated by pos * inv_freq[i] (`rope_interleave=True`).
A config with `rope_interleave=False` pairs (x[i], x[i + d/2]) instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_get_mscale


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] and the cos/sin multiplier ("attention_factor").

    Plain RoPE: inv_freq[k] = theta^(-2k/d). YaRN keeps the fast (high-frequency) planes,
    divides the slow ones by `factor`, and blends linearly between the planes that make
    beta_fast and beta_slow turns over the original context.
    """
    d, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    factor = rs["factor"]
    original_len = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rotations: float) -> float:  # the plane that turns n times over original_len
        return d * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self):
        inv_freq, self.attention_factor = yarn_inv_freq(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, d/2], in fp32."""
        with torch.autocast(position_ids.device.type, enabled=False):
            angles = position_ids.float()[..., None] * self.inv_freq  # (B, S, d/2)
            return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., d] by the angles behind cos/sin [..., d/2] (broadcast)."""
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)
