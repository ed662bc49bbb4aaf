"""The KV cache: for MLA only the latent, kv_lora_rank + qk_rope_head_dim numbers per token per
layer; for GQA (the Qwen2/Qwen3/Llama derivatives) the keys and values of each key-value head.

One preallocated tensor [layers, rows, heads, max_len, width] (MTP layers included; heads and
width from `config.kv_cache_shape`); nothing is reallocated while decoding. Its memory is
mapped lazily: pages are taken when a position is first written, so a long `max_len` costs
memory only for the tokens actually cached. Each row holds one sequence with its own
length, so rows of different lengths decode together. A forward pass works on a contiguous
range of rows (`select`). Attention reads the rows' cached latents in place (`attend`) and its
own new tokens' latents beside them; those are staged, written into the cache after the last
layer has read it (`store`, one in-place write for all layers), and committed by `advance()`
(all of them, or per row only those a speculative step accepted). Reading everything before
writing anything is what lets a compiled decode step update the cache where it lies instead
of copying it (see engine.py).

The cache's precision need not be the model's (`cache_dtype`): by default a model computing in fp32 on a CPU keeps
its cache (MLA's latents, GQA's keys and values) in fp16, which nanoseek's kernels widen as they read them
(kernels/mla.cpp), as llama.cpp keeps its cache in f16: half the memory a token costs, and half the bytes each decode
step reads, which at long contexts no longer crowd the weights out of the CPU's cache.

The main layers and each MTP depth keep separate lengths ("groups"): MTP depth k's entry at
position j needs token j + k, so it fills one step behind the main model.
"""

from __future__ import annotations

import math
import mmap

import torch

from ..kernels import cache_write_available, gqa_attention_available, mla_latent_available
from ..model import ModelConfig

KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cache_dtype(config: ModelConfig, dtype: torch.dtype, device: str | torch.device | None,
                choice: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype of a KV cache for a model computing in `dtype` on `device`: `choice` (a name of KV_CACHE_DTYPES,
    or a dtype), or for "auto" fp16 where a model computes in fp32 on a CPU whose nanoseek kernel reads an fp16 cache
    (MLA's latents; GQA's keys and values), else the model's own dtype (a cache in another precision than a path
    reads is widened at every step)."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice != "auto":
        if choice not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype {choice!r}: one of auto, {', '.join(KV_CACHE_DTYPES)}")
        return KV_CACHE_DTYPES[choice]
    on_cpu = torch.device(device or "cpu").type == "cpu"
    reads_fp16 = gqa_attention_available() if config.is_gqa else mla_latent_available()
    if dtype == torch.float32 and on_cpu and reads_fp16:
        return torch.float16
    return dtype


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device | None) -> torch.Tensor:
    """A zero tensor whose memory is taken page by page as it is written (on CPU: an anonymous
    memory map, which the OS fills with zeros on first touch; elsewhere: torch.zeros)."""
    if torch.device(device or "cpu").type != "cpu" or math.prod(shape) == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    def __init__(self, config: ModelConfig, rows: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        self.n_main = config.num_hidden_layers
        n_layers = self.n_main + config.num_nextn_predict_layers
        heads, width = config.kv_cache_shape
        self.kv = lazy_zeros((n_layers, rows, heads, max_len, width), dtype, device)
        self.lengths = torch.zeros(1 + config.num_nextn_predict_layers, rows, dtype=torch.long, device=device)
        self.rows, self.max_len = rows, max_len
        self.sel = slice(0, rows)
        self._arange = torch.arange(max(max_len, rows, n_layers), device=device)
        # group -> the current forward's positions [B, S], the rows' lengths [B] and arange(attended past)
        self._step: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[int, torch.Tensor] = {}  # group -> its mask, made eagerly (`mask`)
        self._staged: dict[int, torch.Tensor] = {}  # layer -> latents of the current forward's new tokens

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers."""
        return self.kv.shape[0] * self.kv.shape[2] * self.kv.shape[4] * self.kv.element_size()

    def group(self, layer_idx: int) -> int:
        return 0 if layer_idx < self.n_main else layer_idx - self.n_main + 1

    def select(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) take part in the next forward pass."""
        self.sel = slice(start, stop)
        self._step, self._staged, self._masks = {}, {}, {}
        return self

    def positions(self, n_new: int, group: int = 0) -> torch.Tensor:
        """Plan the next forward for `group`: n_new tokens per selected row. Returns their position
        ids [selected rows, n_new]. The attended length is fixed here too (the longest row's past), so
        the forward itself never reads a value back to the host."""
        lengths = self.lengths[group, self.sel]  # (B,)
        past = int(lengths.max())
        if past + n_new > self.max_len:
            raise ValueError(f"cache overflow: {past + n_new} tokens > max_len {self.max_len}")
        pos = lengths[:, None] + self._arange[:n_new]  # (B, S)
        # (the past as a tensor's length, not an int: a compiled step takes it as a size, not a constant; never 1, a
        # size compiled graphs specialize on: the decode step after a 1-token prompt compiled anew while serving, 4-24 s
        # at each row count. The position past the row's length is masked out.)
        span = 2 if past == 1 and self.max_len >= n_new + 2 else past
        self._step[group] = (pos, lengths, self._arange[:span])
        self._masks.pop(group, None)
        return pos

    def mask(self, group: int) -> torch.Tensor:
        """[B, S, T + S] uint8 (1 = may attend) for the planned forward of `group`: each new token sees its row's
        past and the new tokens up to itself. Made where attention asks for it, so a compiled step makes it
        inside its graph (eagerly it was a tenth of a small model's compiled decode step); kept for the other
        layers when eager. Bytes rather than bools: inductor's CPU code stores a comparison's bools one at a
        time (the shipped model's compiled step at batch 8 after 1,950 tokens spent 310 us making its masks;
        as bytes they fuse into the steps around them)."""
        if group in self._masks:
            return self._masks[group]
        pos, lengths, span = self._step[group]
        B, S = pos.shape
        visible = (lengths[:, None] - span).clamp(0, 1).to(torch.uint8)  # (B, T): each row's own past
        causal = (self._arange[:S, None] - self._arange[None, :S] + 1).clamp(0, 1).to(torch.uint8)  # (S, S): the new tokens
        mask = torch.cat([visible[:, None].expand(B, S, span.shape[0]), causal.expand(B, S, S)], dim=-1)
        if not torch.compiler.is_compiling():
            self._masks[group] = mask
        return mask

    def attend(self, layer_idx: int, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage the new tokens' entries [B, S, heads, width]; -> the selected rows' cached entries
        [B, heads, T, width] (a view) and the mask [B, S, T + S] (uint8) over them and the new ones (`mask`)."""
        g = self.group(layer_idx)
        if g not in self._step:
            self.positions(new.shape[1], g)
        self._staged[layer_idx] = new.to(self.kv.dtype)
        B = new.shape[0]
        start = self.sel.start
        return self.kv[layer_idx, start:start + B, :, : self._step[g][2].shape[0]], self.mask(g)

    def store(self, group: int = 0) -> None:
        """Write the latents the current forward staged for `group` into the cache, all its layers in
        one in-place write. Until `advance` commits them they lie beyond each row's length, unseen.
        Keep it out of compiled graphs: written inside one, inductor rewrote the whole cache (every row
        and position) at each step, 270 ms a decode step with 256 rows x 1,024 positions allocated."""
        layers = [i for i in self._staged if self.group(i) == group]  # (a group's layers are consecutive)
        if not layers:
            return
        pos = self._step[group][0]  # (B, S)
        if self.kv.device.type == "cpu" and cache_write_available():
            torch.ops.nanoseek.cache_write(self.kv, [self._staged.pop(i) for i in layers], pos, layers[0], self.sel.start)
            return
        new = torch.stack([self._staged.pop(i) for i in layers])  # (layers, B, S, heads, width)
        idx = self._arange[layers[0]:layers[-1] + 1]
        rows = self._arange[self.sel.start:self.sel.start + pos.shape[0]]
        by_position = self.kv.transpose(2, 3)  # (layers, rows, max_len, heads, width): a view
        by_position.index_put_((idx[:, None, None], rows[None, :, None], pos[None]), new)

    def advance(self, group: int = 0, accepted: torch.Tensor | None = None) -> None:
        """Store what the last forward staged for `group` (if not stored yet) and commit it: all new
        tokens, or `accepted` [rows] of them per row (the others stay beyond the row's length, unseen)."""
        if group not in self._step:
            return
        self.store(group)
        pos = self._step.pop(group)[0]
        self.lengths[group, self.sel] += pos.shape[1] if accepted is None else accepted

    # ---- row bookkeeping for the engine ----
    def reset(self, row: int) -> None:
        self.lengths[:, row] = 0

    def move(self, src: int, dst: int) -> None:
        """Row src's sequence becomes row dst's (src is then free)."""
        n = int(self.lengths[:, src].max())
        self.kv[:, dst, :, :n] = self.kv[:, src, :, :n]
        self.lengths[:, dst] = self.lengths[:, src]
        self.lengths[:, src] = 0

    def read(self, row: int, n: int) -> torch.Tensor:
        """A copy of the first n positions of a row, all layers: [layers, heads, n, width]."""
        return self.kv[:, row, :, :n].clone()

    def entries(self, row: int, n: int) -> torch.Tensor:
        """The first n positions of a row in place (a view, the same layout as `read`)."""
        return self.kv[:, row, :, :n]

    def write(self, row: int, entries: torch.Tensor, n: int) -> None:
        """Start row as the first n positions of `entries` (from `read` or `entries`): main layers and
        MTP groups alike hold n positions."""
        self.kv[:, row, :, :n] = entries[:, :, :n]
        self.lengths[:, row] = n
