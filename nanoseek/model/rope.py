"""Rotary position embedding, with YaRN, Llama-3 and linear context extension.

MLA rotates only the decoupled `qk_rope_head_dim` channels; DeepSeek's checkpoints store them as
consecutive pairs (x[2i], x[2i+1]) = one rotation plane rotated by pos * inv_freq[i]
(`rope_interleave=True`). Qwen2, Qwen3 and Llama rotate the whole head and pair (x[i], x[i + d/2])
(`rope_interleave=False`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_get_mscale


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] and the cos/sin multiplier ("attention_factor").

    Plain RoPE: inv_freq[k] = theta^(-2k/d). `rope_scaling` stretches it for longer contexts:
    linear divides every frequency by `factor`; llama3 and yarn keep the fast (high-frequency)
    planes, divide the slow ones by `factor` and blend in between.
    """
    d, base = config.rotary_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    kind = rs.get("type", rs.get("rope_type"))
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, rs), 1.0
    return yarn_inv_freq(inv_freq, d, base, rs)


def llama3_inv_freq(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    """Llama 3.1's rule, by wavelength over the original context: planes turning more than
    high_freq_factor times stay, planes turning fewer than low_freq_factor times are divided by
    `factor`, and the ones between blend linearly in the number of turns."""
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    turns = rs["original_max_position_embeddings"] * inv_freq / (2 * math.pi)  # turns over the original context
    blend = ((turns - low) / (high - low)).clamp(0, 1)  # 0: slow plane (stretched), 1: fast plane (kept)
    return inv_freq / factor * (1 - blend) + inv_freq * blend


def yarn_inv_freq(inv_freq: torch.Tensor, d: int, base: float, rs: dict) -> tuple[torch.Tensor, float]:
    """YaRN: keep the planes that make beta_fast turns over the original context, divide those
    making fewer than beta_slow by `factor`, blend linearly in the plane index between them; the
    cos/sin multiplier is YaRN's attention temperature."""
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
        self.register_buffer("inv_freq", torch.empty(config.rotary_dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self):
        inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, d/2], in fp32."""
        device = position_ids.device.type
        if torch.is_autocast_enabled(device):  # fp32 under autocast too (entered only then: a compiled
            with torch.autocast(device, enabled=False):  # graph holding an autocast region is never
                return self(position_ids)  # taken from torch's disk cache)
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
