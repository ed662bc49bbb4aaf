"""The small building blocks every layer uses: Linear, RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_operator, float_linear_available


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with faster products for the few rows of a decode step on a CPU where no gradient is wanted: an
    fp32 weight through nanoseek's kernel (`nanoseek::float_linear`, which hands more than a few rows to torch's
    product), any other weight as a matrix-vector product for a single row (torch.mv streams the weight faster
    than the matrix-matrix kernel does for one row: bf16 1.4x for an 8960 x 1536 weight, measured). Under autocast
    (training) every row goes through F.linear, which autocast casts. In a compiled graph a bf16/fp16 product stays
    torch.mv (`opaque_mv`)."""
    if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        N, K = weight.shape
        if weight.dtype == torch.float32 and float_linear_available() and \
                not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            y = torch.ops.nanoseek.float_linear(x.reshape(-1, K), weight)
        elif x.numel() == K:
            narrow = weight.dtype != torch.float32 and torch.compiler.is_compiling()
            y = (opaque_mv if narrow else torch.mv)(weight, x.reshape(-1))
        else:
            return F.linear(x, weight, bias)
        return (y if bias is None else y + bias).view(*x.shape[:-1], N)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) computing through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# torch.mv, kept whole in compiled graphs: inductor would lower it to a loop of its own, which for a bf16
# weight on a CPU reads it more slowly (R1-Distill-1.5B in bf16 at batch 1, 2-core Xeon with AMX: 172 ms a
# compiled token that way, 126 with this, 146 eager)
opaque_mv = cpu_operator("mv(Tensor weight, Tensor x) -> Tensor", torch.mv, lambda weight, x: x.new_empty(weight.shape[0]))


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.numel() <= 16384  # decoding: four small ops dispatch faster than the fused kernel
        if x.dtype == self.weight.dtype == torch.float32:
            if small:
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)  # one fused call
        if small:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)). Dense layers, experts and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """scale [N, 1] (a routed expert's gate weights) multiplies the intermediate activation, which
        equals scaling the output (down_proj is linear) on a tensor half as wide or less."""
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h if scale is None else h * scale)
