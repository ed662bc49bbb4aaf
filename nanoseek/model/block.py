"""The decoder layer: pre-norm attention (MLA, or GQA for the Qwen2/Qwen3/Llama derivatives), then
pre-norm dense MLP or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from .attention import GQA, MLA, KVCache
from .config import ModelConfig
from .layers import MLP, RMSNorm
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GQA(config, layer_idx) if config.is_gqa else MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
