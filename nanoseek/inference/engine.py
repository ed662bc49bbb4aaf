"""Generation from token ids through the latent KV cache.

The engine knows nothing about chat templates or HTTP: ids in, ids out. Prefill runs the
prompt through the model once, filling the latent cache; each decode step then feeds one
token per row and attends over the cache through the absorbed MLA path.
"""

from __future__ import annotations

import torch

from ..model import DeepseekForCausalLM
from .cache import LatentCache


@torch.no_grad()
def generate(model: DeepseekForCausalLM, prompts: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """prompts [B, T] (same length) -> generated ids [B, <= max_new_tokens]; greedy when temperature == 0.
    Rows that produced eos_token_id keep emitting it until every row has."""
    if prompts.dim() != 2 or prompts.numel() == 0:
        raise ValueError(f"prompts must be a non-empty [batch, seq] id tensor, got shape {tuple(prompts.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    vocab = model.config.vocab_size
    if prompts.min() < 0 or prompts.max() >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab})")
    B, T = prompts.shape
    param = next(model.parameters())
    cache = LatentCache(model.config, rows=B, max_len=T + max_new_tokens, dtype=param.dtype, device=param.device)
    tokens, done = prompts.to(param.device), torch.zeros(B, dtype=torch.bool, device=param.device)
    out = []
    for _ in range(max_new_tokens):
        hidden = model(tokens, position_ids=cache.positions(tokens.shape[1]), cache=cache, logits=False).hidden
        logits = model.lm_head(hidden[:, -1]).float()  # only the last position is sampled from
        cache.advance()
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator).squeeze(1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt)
        tokens = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.stack(out, dim=1) if out else prompts.new_zeros(B, 0)
