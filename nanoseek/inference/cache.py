"""The latent KV cache: per token per layer only kv_lora_rank + qk_rope_head_dim numbers.

One preallocated tensor [layers, rows, max_len, kv_lora_rank + qk_rope_head_dim] (MTP layers
included). Each row (a sequence) has its own length, so rows of different lengths decode
together; a forward pass writes its new tokens after each row's cached ones, and `advance()`
commits them once every layer has written.
"""

from __future__ import annotations

import torch

from ..model import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, rows: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
        self.kv_rank = config.kv_lora_rank
        self.kv = torch.zeros(n_layers, rows, max_len, config.kv_lora_rank + config.qk_rope_head_dim,
                              dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_len = max_len
        self._step: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (write positions, mask, end)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers."""
        return self.kv.shape[0] * self.kv.shape[3] * self.kv.element_size()

    def positions(self, n_new: int) -> torch.Tensor:
        """Position ids [rows, n_new] of the next n_new tokens of every row."""
        return self.lengths[:, None] + torch.arange(n_new, device=self.lengths.device)

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        B, S, _ = c_kv.shape
        if self._step is None:
            pos = self.positions(S)  # (B, S)
            end = int(pos.max()) + 1
            if end > self.max_len:
                raise ValueError(f"cache overflow: {end} tokens > max_len {self.max_len}")
            keys = torch.arange(end, device=pos.device)
            mask = keys[None, None, :] <= pos[:, :, None]  # (B, S, T): causal within each row
            self._step = (pos, mask, end)
        pos, mask, end = self._step
        rows = torch.arange(B, device=pos.device)[:, None]
        self.kv[layer_idx, rows, pos] = torch.cat([c_kv, k_pe], dim=-1).to(self.kv.dtype)
        cached = self.kv[layer_idx, :B, :end]
        return cached[..., : self.kv_rank], cached[..., self.kv_rank:], mask

    def advance(self) -> None:
        """Commit the tokens the last forward pass wrote."""
        if self._step is not None:
            self.lengths += self._step[0].shape[1]
            self._step = None
