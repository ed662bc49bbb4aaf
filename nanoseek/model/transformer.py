"""The DeepSeek-V2/V3 causal language model, and its Qwen2/Qwen3/Llama derivatives (R1-Distill,
R1-0528-Qwen3).

Module attribute names are the Hugging Face tensor names (model.embed_tokens,
model.layers.{l}.self_attn.kv_b_proj, ..., lm_head), so `load_state_dict(strict=True)` on a
DeepSeek checkpoint is the whole loader. MTP modules sit at model.layers[num_hidden_layers:]
as in DeepSeek's checkpoints; `layers_main` are the ordinary decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache
from .block import DecoderLayer
from .config import ModelConfig
from .layers import Linear, RMSNorm
from .loss import linear_cross_entropy
from .mtp import MTPLayer
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None  # [B, T, vocab]
    loss: torch.Tensor | None = None  # next-token cross-entropy (mean over non-ignored targets)
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths of their cross-entropies
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' sequence-wise balance losses
    hidden: torch.Tensor | None = None  # [B, T, D] final normed hidden state (MTP's h^0)


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        L = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(L)]
            + [MTPLayer(config, L + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.n_main = L

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> final normed hidden [B, T, D], and the cos/sin the MTP layers reuse."""
        cos, sin = self.rotary_emb(position_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers[: self.n_main]:
            x = layer(x, cos, sin, cache)
        return self.norm(x), cos, sin


class DeepseekForCausalLM(nn.Module):
    """Call with input_ids [B, T]; returns ModelOutput(logits [B, T, vocab], ...).

    labels [B, T] (optional) are the targets aligned with the inputs: labels[b, t] is the
    token that should follow input_ids[b, t]; -100 marks positions without a target.
    With labels, the loss, the MTP loss (MTP depth k at position t predicts labels[b, t + k])
    and, in training, the balance loss are returned too.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # a quantized head stays apart
            self.lm_head.weight = self.model.embed_tokens.weight
        for mtp in self.mtp_layers:  # MTP shares the embedding and the output head
            mtp.embed_tokens = self.model.embed_tokens
            mtp.shared_head.head = self.lm_head

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the embedding and the output head to vocab_size rows (a tokenizer gained tokens); new
        rows start at the mean embedding, so new tokens start as an average token, not as noise."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"vocab_size can only grow ({old} -> {vocab_size})")
        with torch.no_grad():
            for module in (self.model.embed_tokens, self.lm_head):
                w = module.weight
                grown = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)])
                module.weight = nn.Parameter(grown)
        self.model.embed_tokens.num_embeddings = self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size
        self.tie_weights()

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.model.n_main:])

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                logits: bool = True) -> ModelOutput:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32) or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be an integer tensor [batch, seq] of at least one token, got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling() and input_ids.numel():  # (no sync)
            low, high = (int(x) for x in input_ids.aminmax())  # one pass
            if not 0 <= low <= high < self.config.vocab_size:
                raise ValueError(f"input_ids must be token ids in [0, {self.config.vocab_size}), got {low}..{high}")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden, cos, sin = self.model(input_ids, position_ids, cache)
        out = ModelOutput(hidden=hidden)
        if logits:
            out.logits = self.lm_head(hidden)
        if labels is None:
            return out
        out.loss = cross_entropy(self.lm_head, hidden, labels, out.logits)
        if self.mtp_layers:
            out.mtp_loss = self.mtp_loss(hidden, input_ids, labels, cos, sin)
        aux = [layer.mlp.aux_loss for layer in self.model.layers if layer.is_moe and layer.mlp.aux_loss is not None]
        if aux:
            out.aux_loss = torch.stack(aux).sum()
        return out

    def mtp_loss(self, hidden, input_ids, labels, cos, sin) -> torch.Tensor:
        """Mean over depths k of the cross-entropy of predicting labels[:, t + k] at position t."""
        losses, h = [], hidden
        for k, mtp in enumerate(self.mtp_layers, start=1):
            T = input_ids.shape[1] - k
            if T <= 0:
                break
            h = mtp.predict(h[:, :T], input_ids[:, k:], cos[:, :T], sin[:, :T])
            losses.append(cross_entropy(mtp.shared_head.head, mtp.shared_head.norm(h), labels[:, k:]))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one initialisation (DeepSeek-V3 §4.2 uses std 0.006 at scale; config.initializer_range):
        - every Linear weight and the embedding: normal(0, initializer_range); biases 0
        - router weights (mlp.gate.weight): normal(0, initializer_range); router bias 0
        - RMSNorm weights: 1
        - non-persistent buffers (rope frequencies, load counters) are recomputed
        """
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute buffers that are not stored in checkpoints (after building on the meta device)."""
        self.model.rotary_emb.reset_parameters()
        for name, b in self.named_buffers():
            if name.endswith("expert_load") or name.endswith("e_score_correction_bias"):
                b.zero_()

    def num_params(self, active: bool = False) -> int:
        """Parameters of the main model (MTP excluded, tied tensors once); active = per token."""
        shared = {id(self.model.embed_tokens.weight), id(self.lm_head.weight)}
        mtp_only = {id(p) for m in self.mtp_layers for p in m.parameters()} - shared
        total = sum(p.numel() for p in self.parameters() if id(p) not in mtp_only)
        if not active:
            return total
        c = self.config
        expert = 3 * c.hidden_size * c.moe_intermediate_size
        n_moe = sum(1 for layer in self.model.layers[: self.model.n_main] if layer.is_moe)
        return total - n_moe * (c.n_routed_experts - c.num_experts_per_tok) * expert


def cross_entropy(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor,
                  logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != -100, computed in fp32. Without logits at hand
    the head and the loss are computed together in chunks (see loss.py)."""
    if logits is None:
        return linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten())
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def build_model(config: ModelConfig, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, init: bool = True,
                edit: Callable[[nn.Module], None] | None = None) -> DeepseekForCausalLM:
    """Build on the meta device (no memory), materialise on `device`, then init or leave empty for loading.
    `edit` changes the model while it is still on the meta device (the loader swaps in quantized layers)."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
        if dtype is not None:
            model.to(dtype)
        if edit is not None:  # after the cast: the layers it swaps in keep the dtypes they were made with
            edit(model)
    model.to_empty(device=device or "cpu")  # untouched pages: memory is taken as tensors are written
    model.tie_weights()
    if init:
        model.init_weights()
    else:
        model.reset_buffers()
    return model
