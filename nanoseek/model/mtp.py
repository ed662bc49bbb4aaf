"""Multi-token prediction (DeepSeek-V3 §2.2).

MTP module k (k = 1..num_nextn_predict_layers) sees, at position i, the previous depth's
hidden state h^{k-1}_i (h^0 = the main model's final, normed hidden state) and the embedding
of token t_{i+k}, and predicts t_{i+k+1}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])   # embedding first, as the weights are
    h^k  = a full decoder layer over h' (causal)
    logits = shared_head.head(shared_head.norm(h^k))

Checkpoints store module k as `model.layers.{num_hidden_layers + k - 1}`, with its own copies
of the embedding (`embed_tokens`) and output head (`shared_head.head`); here both are tied to
the main model's (the paper shares them), so a copy loads into the same tensor.

Example (one depth, tokens t0..t4 as input_ids, targets = next tokens):
    main:  position i predicts t_{i+1}  -> targets [t1, t2, t3, t4, t5]
    MTP 1: position i in 0..3 reads Emb(t_{i+1}) and predicts t_{i+2} -> targets [t2, t3, t4, t5]
"""

from __future__ import annotations

import torch
from torch import nn

from .block import DecoderLayer
from .config import ModelConfig
from .layers import Linear, RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head: nn.Linear | None = None  # tied to lm_head by the model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


class MTPLayer(DecoderLayer):
    """A full decoder layer plus the MTP extras; `predict` runs one depth."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)
        self.embed_tokens: nn.Embedding | None = None  # tied to model.embed_tokens

    def predict(self, h_prev: torch.Tensor, next_ids: torch.Tensor, cos, sin, cache=None) -> torch.Tensor:
        """h_prev [B, S, D] (depth k-1), next_ids [B, S] (t_{i+k}) -> h^k [B, S, D]."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(h_prev)], dim=-1))
        return self(x, cos, sin, cache)
