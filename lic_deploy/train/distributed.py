"""Devices and several processes for training: PyTorch's own DistributedDataParallel, started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1, `setup` joins the process group (NCCL on
CUDA, gloo on the CPU) and gives each process its device (cuda:LOCAL_RANK with --device cuda). A process alone
(no torchrun, or WORLD_SIZE 1) trains as before, with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lic_deploy.runtime.engines import check_device


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: str  # "cpu" or "cuda:N", this process's device

    @property
    def main(self) -> bool:
        """The process that logs, validates and writes checkpoints."""
        return self.rank == 0


def setup(device: str) -> World:
    """This process's place in the run (see the module docstring)."""
    check_device(device, "train with --device cpu here")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        import torch

        if size > 1:
            device = f"cuda:{local}"
        if ":" in device:  # (set_device needs an index; plain "cuda" is the current device already)
            torch.cuda.set_device(device)
        torch.backends.cudnn.deterministic = True  # bit-exact resume on the same GPU and configuration
        torch.backends.cudnn.benchmark = False
    if size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(rank, size, local, device)


def barrier(world: World) -> None:
    """Wait for every process (at the end of a run: no process leaves while another still talks to it)."""
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def teardown(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: Any, world: World, ignore: list[str]) -> Any:
    """The model as the forward pass sees it: DistributedDataParallel over `model` when several processes
    train (its gradients averaged over them in backward), `model` itself otherwise. `ignore` names parameters
    DDP leaves alone (the entropy bottleneck's quantiles: trained by their own loss, identical on every rank)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ids = [int(world.device.split(":")[1])] if world.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def mean_over_ranks(values: list[float], world: World) -> list[float]:
    """Each value averaged over the processes (for the logged training loss)."""
    if world.size == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return (t / world.size).tolist()


def agree(flag: bool, world: World) -> bool:
    """Rank 0's decision, on every rank (to stop together)."""
    if world.size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=world.device)
    dist.broadcast(t, 0)
    return bool(t.item())
