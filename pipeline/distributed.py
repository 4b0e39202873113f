"""Data-parallel training without DDP's equal-batches assumption.

Units hold different numbers of samples, so ranks may have different numbers of batches in an
epoch. Each step every rank reports its batch size; gradients of per-rank *sums* are summed and
divided by the global count, which is exactly the gradient of the mean over the global batch. A
rank whose loader has run out takes part with zero gradients until every rank has run out.
Started by `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the environment), gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def global_count(world: World, count: int) -> int:
    if not world.distributed:
        return count
    t = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def reduce_gradients(world: World, model: nn.Module, global_samples: int) -> None:
    """Sum the ranks' gradients of their per-rank loss sums and divide by the global sample count."""
    if not world.distributed:
        return
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= max(global_samples, 1)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
