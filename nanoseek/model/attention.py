"""Attention: MLA (DeepSeek-V2/V3) and grouped-query attention (the Qwen2/Qwen3/Llama derivatives).

MLA: Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values of all heads are rebuilt from one small latent per token: c_kv (kv_lora_rank)
plus one rope key shared by all heads (qk_rope_head_dim). Two paths, side by side:

- full (training, prefill): expand the latent through kv_b_proj into per-head k_nope and v,
  then ordinary causal attention;
- absorbed (decode from a latent cache): fold kv_b_proj's key half into the query and its value
  half into the output, so attention runs directly over the cached latents and the cached
  sequence is never expanded. The cache holds kv_lora_rank + qk_rope_head_dim numbers per token.

GQA: every head has its own key and value of head_dim channels, shared by
num_attention_heads / num_key_value_heads query heads ("a group"); RoPE turns the whole head (Qwen3
RMS-normalises each head's queries and keys before it).
The cache holds k and v of each key-value head.

Both read a cache through one interface (`KVCache`): per layer and token the cache holds
`config.kv_cache_shape` = (heads, width) numbers, the latent for MLA ((1, c + r)) and the keys and
values for GQA ((2 * kv heads, head_dim): k and v of kv head h at 2h and 2h + 1, so the keys of
all rows and heads are one strided batch of [T, head_dim] matrices, read in place).

Letters in einsums: b batch, s query positions, t key positions, h heads, d head channels
(nope or v), c latent channels (kv_lora_rank), r rope channels, g query heads per kv head.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import MLA_MAX_LATENT, MLA_MAX_ROWS, gqa_attention_available, mla_available, mla_latent_available
from .config import ModelConfig, yarn_get_mscale
from .layers import Linear, RMSNorm
from .rope import apply_rope

MATH_SCORES_BYTES = 16 << 20  # see causal_attention: the largest fp32 scores [B, H, rows, S] of a query block
MATH_BLOCKS = 8  # and the most query blocks computed as products; past either, the fused kernel


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention over q/k [B, H, S, d] and v [B, H, S, dv] (k and v with H / g heads under
    enable_gqa) -> [B, H, S, dv]. On a CPU in bf16 (or fp16), inside a compiled region and where the
    scores are small (`MATH_SCORES_BYTES`, `MATH_BLOCKS`), as products and a softmax that inductor fuses,
    a block of queries at a time over the keys up to its last one (so the products skip most of the
    future's scores, as the fused kernel does): a layer's forward and backward (AMD Zen4, 2 threads)
    took 23 ms at 8 x 4 x 512 x 48 (4 blocks of 128) against 46 for the fused kernel in fp32 and 77 for
    one block, 8 ms at 8 x 4 x 256 (4 blocks of 64) against 15 and 17; at 2 x 4 x 1,024 as long as the
    fused kernel. Eagerly a layer also ran faster (36 against 51 ms at 8 x 4 x 512), but a whole eager
    cpu-tiny step measured no faster, so eager training keeps the fused kernel. Elsewhere on a CPU in bf16 the fused
    kernel runs in fp32: its reduced-precision backward is about 3x its fp32 backward (Xeon with AMX,
    2 threads: [8, 4, 256, 48] 22.6 vs 7.8 ms, [8, 8, 512, 32] 92 vs 49 ms) with forwards within 1.8x.
    Forwards without gradients run the same way, so they compute exactly what the training forward
    does (GRPO's reference and behaviour log-probs against the update's; the engine's decoding never
    comes here). The output comes back in q's dtype."""
    narrow = q.dtype in (torch.bfloat16, torch.float16)
    B, H, S, _ = q.shape
    rows = 64 if S <= 256 else 128  # queries a block
    if narrow and q.device.type == "cpu" and torch.compiler.is_compiling() and -(-S // rows) <= MATH_BLOCKS \
            and B * H * rows * S * 4 <= MATH_SCORES_BYTES:
        if enable_gqa:  # each kv head serves H / Hkv query heads
            k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
        return torch.cat([_causal_block(q[:, :, i:i + rows], k[:, :, :i + rows], v[:, :, :i + rows], scale, i)
                          for i in range(0, S, rows)], dim=2)
    pad = q.shape[-1] - v.shape[-1]  # fused kernels want v as wide as q and k: pad, then slice
    v_wide = F.pad(v, (0, pad)) if pad > 0 else v
    if not (narrow and q.device.type == "cpu"):
        out = F.scaled_dot_product_attention(q, k, v_wide, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v_wide.float(), is_causal=True, scale=scale,
                                                 enable_gqa=enable_gqa).to(q.dtype)
    return out[..., : v.shape[-1]]


def _causal_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int) -> torch.Tensor:
    """Causal attention of queries [B, H, r, d] at positions start.. over the keys [B, H, start + r, d] (values
    [.., dv]) up to them -> [B, H, r, dv]."""
    r, n = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, r, n)
    future = torch.ones(r, n, dtype=torch.bool, device=q.device).triu(start + 1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype) @ v


class KVCache(Protocol):
    """What attention needs from a KV cache (the engine's cache implements it)."""

    def attend(self, layer_idx: int, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the new tokens' entries [B, S, heads, width] (the cache stores them after the forward);
        return the cached ones [B, heads, T, width] and a uint8 mask [B, S, T + S] over the cached
        then the new positions (1 = may attend)."""


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.interleaved = config.rope_interleave
        D, H, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        self.q_lora = config.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = Linear(D, H * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=bias)

        self.softmax_scale = config.qk_head_dim ** -0.5
        rs = config.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):  # YaRN's temperature, applied to q.k
            self.softmax_scale *= yarn_get_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, D] -> q_nope [B,S,H,d], q_pe [B,S,H,r] (rotated), c_kv [B,S,c] (normed), k_pe [B,S,r] (rotated)."""
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(2), sin.unsqueeze(2), self.interleaved)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return q_nope, q_pe, self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin, self.interleaved)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if cache is None:
            out = self.full_attention(q_nope, q_pe, c_kv, k_pe)
        else:
            new = torch.cat([c_kv, k_pe], dim=-1)  # (B, S, c + r): the latent the cache keeps
            past, mask = cache.attend(self.layer_idx, new.unsqueeze(2))
            out = self.absorbed_attention(q_nope, q_pe, past[:, 0], new, mask)
        return self.o_proj(out.flatten(2))  # (B, S, H*dv) -> (B, S, D)

    def full_attention(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        """Causal attention with keys/values expanded from the latent. Returns [B, S, H, dv]."""
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, S, H, dqk)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope_dim)], dim=-1)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale)  # (B, H, S, dv)
        return out.transpose(1, 2)

    def absorbed_attention(self, q_nope, q_pe, past, new, mask) -> torch.Tensor:
        """Attention straight over latents: the cached past [B, T, c + r] and the new tokens' own
        [B, S, c + r] (c_kv then k_pe, as the cache stores them), mask [B, S, T + S]. Returns
        [B, S, H, dv]. The past is in the cache's dtype (nanoseek's kernels read fp16 and bf16 beside fp32
        activations; any other is widened here), the new latents in the model's. The key half of
        kv_b_proj turns each query into the latent space, so one product with [c_kv ; k_pe] scores
        the nope and rope parts together; heads are folded into the rows (S*H) so the cache is read
        once per row, never copied or expanded per head."""
        B, S, H, d = q_nope.shape
        c, T = self.kv_rank, past.shape[1]
        kv_b = self.kv_b_proj
        kernel_latents = past.dtype in (torch.float32, torch.float16, torch.bfloat16) and new.dtype == torch.float32
        fits = q_nope.dtype == torch.float32 and 0 < B * S <= MLA_MAX_ROWS and c <= MLA_MAX_LATENT \
            and q_nope.device.type == "cpu" and kernel_latents  # what the C++ operators take
        if hasattr(kv_b, "dequantize"):  # quantized, int4 (quant.QuantLinear, swap_linears): a few rows of fp32 through
            # the C++ operator, whose products read the int4 codes (kernels/ops.cpp), else the weight dequantized
            operands = kv_b.int4_operands()
            if fits and operands is not None and c % 64 == 0 and mla_available():
                return torch.ops.nanoseek.mla_attention_int4(q_nope, q_pe, past, new, mask, *operands, self.softmax_scale)
            weight = kv_b.dequantize(q_nope.dtype)
        else:
            weight = kv_b.weight
        w = weight.view(H, self.nope_dim + self.v_dim, c)  # key half w_uk (H, d, c), value half w_uv (H, dv, c)
        # kv_b_proj kept in bf16 under fp32 activations (quant.narrow_latent_projections), a few rows: all of this in
        # one C++ operator, whose products read the bf16 weight at the memory's speed (kernels/ops.cpp, mla.cpp)
        if fits and w.dtype == torch.bfloat16 and w.device.type == "cpu" and mla_available():
            return torch.ops.nanoseek.mla_attention(q_nope, q_pe, past, new, mask, w, self.softmax_scale)
        if w.dtype != q_nope.dtype:
            w = w.to(q_nope.dtype)
        q_rows = q_nope.reshape(B * S, H, d).transpose(0, 1)  # (H, B*S, d)
        # a bf16 batched product on a CPU copies operands whose batches are not evenly spaced, as these
        # halves of w are, so there w is read whole (twice the reads, no copies: DeepSeek-V2-Lite's shape
        # on a 2-core Xeon with AMX, both products 488 us a layer against 954); fp32 takes the halves (340)
        whole = w.dtype != torch.float32 and w.device.type == "cpu"
        if whole:  # zero query channels against w's value half
            q_latent = F.pad(q_rows, (0, self.v_dim)) @ w  # (H, B*S, c)
        else:
            q_latent = q_rows @ w[:, : self.nope_dim]
        q = torch.cat([q_latent.transpose(0, 1).reshape(B, S * H, c), q_pe.reshape(B, S * H, -1)], dim=-1)
        if q.dtype == torch.float32 and q.device.type == "cpu" and kernel_latents and mla_latent_available():
            # scores, mask, softmax and weighted latents in one pass over the latents (kernels/mla.cpp)
            out_latent = torch.ops.nanoseek.mla_latent_attention(q, past, new, mask, c, self.softmax_scale)
        else:
            if past.dtype != q.dtype:  # a cache kept in another precision than the model computes in
                past = past.to(q.dtype)
            scores = torch.cat([q @ past.transpose(1, 2), q @ new.transpose(1, 2)], dim=-1)  # (B, S*H, T+S)
            scores = (scores.view(B, S, H, -1) * self.softmax_scale).float().masked_fill(mask[:, :, None] == 0, float("-inf"))
            probs = scores.softmax(dim=-1).type_as(q_nope).view(B, S * H, -1)
            out_latent = probs[..., :T] @ past[..., :c] + probs[..., T:] @ new[..., :c]  # (B, S*H, c)
        out_rows = out_latent.view(B * S, H, c).transpose(0, 1)  # (H, B*S, c)
        if whole:
            out = (w @ out_rows.transpose(1, 2))[:, self.nope_dim:].transpose(1, 2)  # (H, d + dv, B*S) -> (H, B*S, dv)
        elif B * S == 1:  # w_uv [H, dv, c] times the row, not the row times its transpose: DeepSeek-V2-Lite's
            # shape streamed from memory on a 2-vCPU Zen4, 120-140 us against 220-270 (at 8 rows 355 against 330)
            out = (w[:, self.nope_dim:] @ out_rows.transpose(1, 2)).transpose(1, 2)  # (H, dv, 1) -> (H, 1, dv)
        else:
            out = out_rows @ w[:, self.nope_dim:].transpose(1, 2)  # (H, B*S, dv)
        return out.transpose(0, 1).reshape(B, S, H, self.v_dim)


GQA_KERNEL_TOKENS = 8  # new tokens a row up to which GQA's cached attention takes nanoseek's kernel (decoding)


class GQA(nn.Module):
    """Grouped-query attention with RoPE over the whole head (Qwen2, Qwen3, Llama; HF module names)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, H, Hkv, d = config.hidden_size, self.n_heads, self.n_kv, self.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(D, H * d, bias=bias)
        self.k_proj = Linear(D, Hkv * d, bias=bias)
        self.v_proj = Linear(D, Hkv * d, bias=bias)
        self.o_proj = Linear(H * d, D, bias=bias and config.model_type != "qwen2")  # Qwen2: no o_proj bias
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: each head's queries and keys normalised over its d channels
            self.q_norm, self.k_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)
        self.softmax_scale = d ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        q, k = self.q_proj(x).view(B, S, H, d), self.k_proj(x).view(B, S, Hkv, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2), False)
        k = apply_rope(k, cos.unsqueeze(2), sin.unsqueeze(2), False)
        v = self.v_proj(x).view(B, S, Hkv, d)
        if cache is None:
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale,
                                   enable_gqa=H != Hkv)
            out = out.transpose(1, 2)  # (B, S, H, d)
        else:
            new = torch.stack([k, v], dim=3).view(B, S, 2 * Hkv, d)  # what the cache keeps: k_0, v_0, k_1, ...
            past, mask = cache.attend(self.layer_idx, new)
            out = self.cached_attention(q, past, new, mask)
        return self.o_proj(out.reshape(B, S, H * d))

    def cached_attention(self, q, past, new, mask) -> torch.Tensor:
        """q [B, S, H, d] over the cached past [B, 2*Hkv, T, d] (read in place) and the new tokens'
        [B, S, 2*Hkv, d] (k and v of each kv head in turn), mask [B, S, T + S]. The g query heads of a
        group and the S positions are folded into the rows of one product per kv head. Returns [B, S, H, d]."""
        B, S, H, d = q.shape
        Hkv, T = self.n_kv, past.shape[2]
        g = H // Hkv
        if S <= GQA_KERNEL_TOKENS and q.device.type == "cpu" and d <= MLA_MAX_LATENT and gqa_attention_available():
            # a few tokens a row (decoding): one pass over each kv head's cached keys and values, read where they lie
            # (fp16 in a half-precision cache), for all its query heads (kernels/mla.cpp). torch's products below read
            # the cache twice with a softmax between, and slowly at a few rows: an R1-Distill-Qwen-1.5B layer
            # (12 heads over 2, d = 128) at 8 sequences x 2,000 cached tokens took 6.1 ms on one thread of a Zen4
            return torch.ops.nanoseek.gqa_attention(q, past, new, mask, self.softmax_scale)
        if past.dtype != q.dtype:  # a cache kept in another precision than the model computes in (Engine kv_cache_dtype)
            past = past.to(q.dtype)
        q = q.view(B, S, Hkv, g, d).permute(0, 2, 3, 1, 4).reshape(B * Hkv, g * S, d)
        k_past, v_past = past[:, 0::2].flatten(0, 1), past[:, 1::2].flatten(0, 1)  # (B*Hkv, T, d): views
        new = new.transpose(1, 2)  # (B, 2*Hkv, S, d)
        k_new, v_new = new[:, 0::2].reshape(B * Hkv, S, d), new[:, 1::2].reshape(B * Hkv, S, d)
        scores = torch.cat([q @ k_past.transpose(1, 2), q @ k_new.transpose(1, 2)], dim=-1)
        scores = (scores.view(B, Hkv, g, S, -1) * self.softmax_scale).float()  # (B, Hkv, g, S, T+S)
        probs = scores.masked_fill(mask[:, None, None] == 0, float("-inf")).softmax(dim=-1)
        probs = probs.to(q.dtype).view(B * Hkv, g * S, -1)
        out = probs[..., :T] @ v_past + probs[..., T:] @ v_new  # (B*Hkv, g*S, d)
        return out.view(B, Hkv, g, S, d).permute(0, 3, 1, 2, 4).reshape(B, S, H, d)
