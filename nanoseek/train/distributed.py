"""torch.distributed plumbing for the training loop: process group from torchrun's environment,
FSDP2 sharding, and full (unsharded) state dicts so checkpoints move between world sizes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1:
        return DistInfo(device=want)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return DistInfo(rank, world, want)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str | None = None) -> Iterator[DistInfo]:
    """setup() for the block, teardown() however it ends."""
    info = setup(device)
    try:
        yield info
    finally:
        teardown()


def shard(model: nn.Module) -> None:
    """FSDP2: each main decoder layer is its own unit; the root unit holds the embedding, final
    norm, head and the MTP layers (which share the embedding and head, so they stay with them)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers[: model.model.n_main]:
        fully_shard(layer)
    fully_shard(model)


def all_reduce_sum(values: list[float] | torch.Tensor, info: DistInfo) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64, device="cpu" if info.device.type == "cpu" else info.device)
    if info.active:
        dist.all_reduce(t)
    return t.cpu()


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU (gathered from the shards when distributed)."""
    if not info.active:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    if not info.active:
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # tied tensors (MTP's embedding and head) are loaded once, under the name the model registers them by;
    # the state was already checked name by name by load_model
    canonical = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    state = {k: v for k, v in state.items() if k in canonical}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Optimizer state keyed by parameter names (not positions), unsharded, on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    """Not strict: a parameter that never had a gradient has no state to restore (GRPO never trains the MTP
    layer; resuming a GRPO run failed on it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True, strict=False))
