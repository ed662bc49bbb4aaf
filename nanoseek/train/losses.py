"""The language-model objective (pretraining, SFT), and pure functions for the RL and
distillation objectives: tensors in, tensors out.

Shapes: N completions (P prompts x G samples, grouped consecutively), T completion positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.shards import IGNORE


class LMObjective:
    """Next-token cross-entropy + mtp_lambda * MTP loss + the balance loss, summed over targets."""

    def __init__(self, mtp_lambda: float = 0.3, device: torch.device | str = "cpu"):
        self.mtp_lambda, self.device = mtp_lambda, torch.device(device)

    def weight(self, batch) -> int:
        return int((batch[1] != IGNORE).sum())

    def __call__(self, model, batch):
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        n = self.weight(batch)
        out = model(x, labels=y, logits=False)
        total = out.loss * n
        metrics = {"loss": out.loss.detach() * n}
        if out.mtp_loss is not None:
            total = total + self.mtp_lambda * out.mtp_loss * n
            metrics["mtp_loss"] = out.mtp_loss.detach() * n
        if out.aux_loss is not None:
            total = total + out.aux_loss * n
            metrics["aux_loss"] = out.aux_loss.detach() * n
        return total, metrics


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, divided by the group's std (scale=False: Dr. GRPO,
    no std division). rewards [N] -> advantages [N]."""
    r = rewards.view(-1, group_size)  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: members of groups whose rewards are not all equal (the others carry no signal)."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values > r.min(dim=1).values).repeat_interleave(group_size)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, 0 when equal."""
    d = ref_logp - logp
    return d.exp() - d - 1


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                        eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate per token, -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).
    logp, old_logp [N, T], adv [N] -> (loss [N, T], clipped [N, T] bool)."""
    ratio = (logp - old_logp).exp()
    a = adv.unsqueeze(1)
    unclipped, clipped = ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int) -> tuple[torch.Tensor, float]:
    """-> (sum, weight) whose ratio is the loss: "token" = mean over all completion tokens (DAPO),
    "sequence" = mean over completions of their per-token mean (GRPO paper), "dr_grpo" = sum over
    tokens / (N * max_len) (no length normalisation). Summed over a batch so the training loop
    can divide by the weight of the whole step."""
    m = mask.to(per_token.dtype)
    if mode == "token":
        return (per_token * m).sum(), float(m.sum())
    if mode == "sequence":
        return ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).sum(), float(per_token.shape[0])
    if mode == "dr_grpo":
        return (per_token * m).sum(), float(per_token.shape[0] * max_len)
    raise ValueError(f"loss normalisation must be token, sequence or dr_grpo, got {mode!r}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits [N, T, V], targets [N, T] -> [N, T] (fp32)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 2.0) -> tuple[torch.Tensor, float]:
    """Forward KL(teacher || student) at temperature T, times T^2 (Hinton et al.), summed over the
    masked positions -> (sum, number of positions). logits [N, T, V], mask [N, T]."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(dim=-1) * t * t  # (N, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum(), float(m.sum())
