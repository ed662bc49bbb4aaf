"""Cross-entropy over the output head without materialising the [tokens, vocab] logits.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)` (mean over the targets that are
not -100; 0 when there are none). It walks the tokens in chunks: each chunk's logits, softmax
and loss are computed while they sit in cache, and when gradients are needed the chunk's
gradients for the hidden states and the head weight are computed right away (softmax minus
one-hot, times the two matmuls), so backward only scales them. Same FLOPs as the plain path,
a fraction of its memory traffic. Under autocast the matmuls run in the autocast dtype and the
softmax in fp32.
"""

from __future__ import annotations

import torch

IGNORE = -100
GROUP_BYTES = 32 << 20  # see _LinearCrossEntropy.forward


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, mm_dtype):
        N, V = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE
        n = int(valid.sum())
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(mm_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        # A narrower matmul dtype adds each product into the fp32 grad_w with a pass over [V, D]: done once
        # per group of chunks (their gradients kept in `g_rows`, up to GROUP_BYTES), not once per chunk.
        narrow = mm_dtype != torch.float32
        group = max(chunk, GROUP_BYTES // (V * w.element_size()) // chunk * chunk) if narrow else chunk
        if want_grad:
            g_rows = torch.empty(min(group, N), V, dtype=mm_dtype, device=hidden.device)
        for g0 in range(0, N, group):
            h_group = hidden[g0:g0 + group].to(mm_dtype)
            for s in range(0, len(h_group), chunk):
                h = h_group[s:s + chunk]
                y, ok = labels[g0 + s:g0 + s + chunk].clamp(min=0), valid[g0 + s:g0 + s + chunk]
                logits = (h @ w.t()).float()  # (c, V)
                target = logits.gather(1, y.unsqueeze(1)).squeeze(1)
                top = logits.amax(dim=1, keepdim=True)
                e = logits.sub_(top).exp_()  # in place: exp(logit - max), no second (c, V) tensor
                z = e.sum(dim=1, keepdim=True)
                total += ((top.squeeze(1) + z.squeeze(1).log() - target) * ok).sum()
                if want_grad:
                    row_weight = ok / max(n, 1)  # (c,): each row's share of the mean
                    g = e.mul_((row_weight.unsqueeze(1) / z))  # softmax times the row's weight, in place
                    g[torch.arange(len(y), device=y.device), y] -= row_weight  # minus the weighted one-hot
                    g = g_rows[s:s + len(h)].copy_(g) if narrow else g
                    grad_h[g0 + s:g0 + s + len(h)] = (g @ w).to(hidden.dtype)
                    if not narrow:
                        grad_w.addmm_(g.t(), h)  # accumulated in place: no (V, D) temporary per chunk
            if want_grad and narrow:
                grad_w += g_rows[:len(h_group)].t() @ h_group
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 256) -> torch.Tensor:
    """hidden [N, D], weight [V, D], labels [N] (-100 = no target) -> mean cross-entropy (fp32 scalar)."""
    device = hidden.device.type
    mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, mm_dtype)
