"""The latent KV cache: per token per layer only kv_lora_rank + qk_rope_head_dim numbers.

One preallocated tensor [layers, rows, max_len, kv_lora_rank + qk_rope_head_dim] (MTP layers
included); nothing is reallocated while decoding. Each row holds one sequence with its own
length, so rows of different lengths decode together. A forward pass works on a contiguous
range of rows (`select`), writes its new tokens after each row's cached ones, and `advance()`
commits them (all of them, or per row only those a speculative step accepted).

The main layers and each MTP depth keep separate lengths ("groups"): MTP depth k's entry at
position j needs token j + k, so it fills one step behind the main model.
"""

from __future__ import annotations

import torch

from ..model import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, rows: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        self.n_main = config.num_hidden_layers
        n_layers = self.n_main + config.num_nextn_predict_layers
        self.kv_rank = config.kv_lora_rank
        self.kv = torch.zeros(n_layers, rows, max_len, config.kv_lora_rank + config.qk_rope_head_dim,
                              dtype=dtype, device=device)
        self.lengths = torch.zeros(1 + config.num_nextn_predict_layers, rows, dtype=torch.long, device=device)
        self.rows, self.max_len = rows, max_len
        self.sel = slice(0, rows)
        self._step: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # group -> (positions, mask, rows)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers."""
        return self.kv.shape[0] * self.kv.shape[3] * self.kv.element_size()

    def group(self, layer_idx: int) -> int:
        return 0 if layer_idx < self.n_main else layer_idx - self.n_main + 1

    def select(self, start: int, stop: int) -> "LatentCache":
        """Rows [start, stop) take part in the next forward pass."""
        self.sel = slice(start, stop)
        self._step = {}
        return self

    def positions(self, n_new: int, group: int = 0) -> torch.Tensor:
        """Plan the next forward for `group`: n_new tokens per selected row. Returns their position
        ids [selected rows, n_new]; the mask and the attended length are fixed here too, so the
        forward itself never reads a value back to the host (and compiles to one graph)."""
        pos = self.lengths[group, self.sel, None] + torch.arange(n_new, device=self.lengths.device)
        end = int(pos.max()) + 1
        if end > self.max_len:
            raise ValueError(f"cache overflow: {end} tokens > max_len {self.max_len}")
        keys = torch.arange(end, device=pos.device)
        rows = torch.arange(self.sel.start, self.sel.start + pos.shape[0], device=pos.device)[:, None]
        self._step[group] = (pos, keys[None, None, :] <= pos[:, :, None], rows)
        return pos

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Store the new tokens' latents; -> every cached latent of the selected rows and the mask
        [rows, new, cached] that lets each new token see its row's past and itself."""
        g = self.group(layer_idx)
        if g not in self._step:
            self.positions(c_kv.shape[1], g)
        pos, mask, rows = self._step[g]
        self.kv[layer_idx, rows, pos] = torch.cat([c_kv, k_pe], dim=-1).to(self.kv.dtype)
        cached = self.kv[layer_idx, self.sel, : mask.shape[-1]]
        return cached[..., : self.kv_rank], cached[..., self.kv_rank:], mask

    def advance(self, group: int = 0, accepted: torch.Tensor | None = None) -> None:
        """Commit the tokens the last forward wrote for `group` (or `accepted` [rows] of them per row)."""
        if group in self._step:
            n = self._step.pop(group)[0].shape[1] if accepted is None else accepted
            self.lengths[group, self.sel] += n

    # ---- row bookkeeping for the engine ----
    def reset(self, row: int) -> None:
        self.lengths[:, row] = 0

    def move(self, src: int, dst: int) -> None:
        """Row src's sequence becomes row dst's (src is then free)."""
        n = int(self.lengths[:, src].max())
        self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.lengths[:, dst] = self.lengths[:, src]
        self.lengths[:, src] = 0

    def read(self, row: int, n: int) -> torch.Tensor:
        """A copy of the first n positions of a row, all layers: [layers, n, width]."""
        return self.kv[:, row, :n].clone()

    def write(self, row: int, latents: torch.Tensor, n: int) -> None:
        """Start row as the first n positions of `latents` (from `read`): main layers and MTP groups
        alike hold n positions."""
        self.kv[:, row, :n] = latents[:, :n]
        self.lengths[:, row] = n
