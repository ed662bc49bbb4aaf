import pytest
import torch

from nanoseek.model import get_preset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return get_preset("tiny")


def randomize_(model: torch.nn.Module, std: float = 0.1) -> None:
    """Fill every parameter and float buffer with noise, so norms, biases and routing all matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + std * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
