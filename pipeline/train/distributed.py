"""Data parallelism: torch's DistributedDataParallel, plus the exact mean over an uneven global batch.

Started by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment): NCCL on
CUDA (each rank on `cuda:$LOCAL_RANK`), gloo on CPU. Every collective here puts its tensors on the
process group's device (`World.comm_device`): NCCL refuses CPU tensors.

Units hold different numbers of samples, so in a step ranks may hold batches of different sizes,
and at the end of an epoch some ranks may hold none. The gradient every rank applies is the
gradient of the mean loss over the *global* batch, as in one process on the union of the batches:

- Each step starts with one all-reduce of (samples, empty ranks) (`step_counts`).
- When every rank has a batch, rank r backpropagates `mean_r * n_r / N` through DDP, whose comm
  hook *sums* the ranks' gradients (`_sum_hook`, not DDP's average): sum_r n_r grad(mean_r) / N.
- When some rank has no batch (the tail of an epoch), the ranks with a batch backpropagate the
  same scaled loss through the bare module, and one flat all-reduce sums the gradients (zeros on
  the empty ranks); no DDP forward runs that step, so DDP issues no collective that an empty rank
  would have to shadow.

Why not `torch.distributed.algorithms.Join`: a joined rank shadows DDP's all-reduces but never
sees the reduced gradient, so its optimiser and EMA stop stepping and its weights are only
re-broadcast at the end; rank 0 (which writes every checkpoint) may be such a rank. Here every
rank steps every time with the same gradient, so all ranks hold the same weights, optimiser state
and EMA at every step.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class LaunchError(ValueError):
    """A device or launch option that cannot work under this torchrun (a user error)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # this rank's training device (cuda:$LOCAL_RANK under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors live: the rank's GPU with NCCL, the CPU with gloo."""
        device = torch.device(self.device)
        return device if device.type == "cuda" else torch.device("cpu")


def rank_device(device: str, local_rank: int, local_world: int) -> str:
    """`--device cuda` means this rank's GPU, `cuda:$LOCAL_RANK`; an explicit `cuda:K` with several
    ranks on the node would put them all on one GPU, so it is refused."""
    kind = torch.device(device)
    if kind.type != "cuda":
        return device
    if kind.index is None:
        return f"cuda:{local_rank}"
    if local_world > 1:
        raise LaunchError(f"--device {device}: {local_world} ranks on this node would all train on one GPU; "
                          "pass --device cuda (each rank takes cuda:$LOCAL_RANK)")
    return device


def init_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = rank_device(device, local_rank, local_world)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # "cuda" tensors (e.g. an online teacher's) land here too
    if size <= 1:
        return World(device=device)
    if not dist.is_initialized():
        if torch.device(device).type == "cuda":
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if not world.distributed:
        return
    if world.comm_device.type == "cuda":
        dist.barrier(device_ids=[world.comm_device.index])
    else:
        dist.barrier()


def step_counts(world: World, count: int) -> tuple[int, int]:
    """(samples over all ranks, ranks without a batch) of one step, in one all-reduce."""
    if not world.distributed:
        return count, int(count == 0)
    t = torch.tensor([count, int(count == 0)], dtype=torch.int64, device=world.comm_device)
    dist.all_reduce(t)
    return int(t[0].item()), int(t[1].item())


def sum_over_ranks(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over the ranks, back on the tensor's own device."""
    if not world.distributed:
        return tensor
    t = tensor.to(world.comm_device).clone()
    dist.all_reduce(t)
    return t.to(tensor.device)


def global_count(world: World, count: int) -> int:
    """`count` summed over the ranks (every rank gets the total)."""
    return int(sum_over_ranks(world, torch.tensor([count], dtype=torch.int64))[0])


# ---------------------------------------------------------------------------------------------- gradients


def _sum_hook(group, bucket):
    """DDP comm hook: sum the bucket over ranks (the loss is already scaled by n_r / N). No type
    annotations: DDP compares them with the real classes, and this module postpones annotations."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_model(world: World, model: nn.Module) -> nn.Module:
    """The module the training forward runs through: DDP under torchrun, the model itself alone.

    The transferred layers read teacher signals from a context set before each forward and leave
    their records there; DDP only wraps forward, so this works unchanged. Every parameter takes
    part in every mode's loss (copy modes still use V of the same qkv projection), so
    find_unused_parameters stays off (tests/test_distributed.py runs every mode through DDP).
    The model has no buffers that change, so they are not broadcast each forward."""
    if not world.distributed:
        return model
    device = torch.device(world.device)
    ddp_class = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_class).parameters
               else {"broadcast_buffers": False})  # the newer name, where torch has it
    ddp = ddp_class(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False,
                    **no_sync)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def sum_gradients(world: World, model: nn.Module) -> None:
    """Sum the ranks' gradients in one flat all-reduce (a missing gradient counts as zeros); for
    the steps where some rank has no batch and DDP's hooks did not run."""
    if not world.distributed:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params]).to(world.comm_device)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def loss_weight(world: World, count: int, global_count: int) -> float:
    """Factor on a rank's mean loss so that the summed gradients are those of the global mean."""
    return count / global_count if world.distributed else 1.0


# ---------------------------------------------------------------------------------------------- debugging

DUMP_ENV, STALL_ENV = "ATTNCACHE_DEBUG_GRADS", "ATTNCACHE_DEBUG_STALL_AT"


def stall_at(step: int) -> None:
    """With $ATTNCACHE_DEBUG_STALL_AT=K every rank stops (sleeps) before step K: the resume test
    kills one rank at a known step instead of racing the run."""
    if os.environ.get(STALL_ENV) == str(step):
        import time

        while True:
            time.sleep(60)


def dump_step(step: int, rank: int, model: nn.Module, batch: dict | None, via: str) -> None:
    """With $ATTNCACHE_DEBUG_GRADS=DIR, write each step's reduced gradients, the weights they were
    taken at and this rank's batch to DIR/step{step}.rank{rank}.safetensors (`via`: "ddp" or "flat",
    how they were summed): the distributed tests rebuild the step in one process on the union of
    the ranks' batches and compare. Off (and free) without the variable."""
    where = os.environ.get(DUMP_ENV)
    if not where:
        return
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = {f"grad.{k}": p.grad.detach().cpu().contiguous() for k, p in model.named_parameters()
               if p.grad is not None}
    tensors.update({f"param.{k}": p.detach().cpu().contiguous() for k, p in model.named_parameters()})
    keys = ""
    if batch is not None:
        tensors.update({"batch.image": batch["image"].contiguous(), "batch.target": batch["target"].contiguous(),
                        "batch.label": batch["label"].contiguous()})
        tensors.update({f"batch.factors.{n}": a.contiguous() for n, a in batch["factors"].items()})
        keys = "\n".join(batch["key"])
    Path(where).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(where) / f"step{step}.rank{rank}.safetensors"), metadata={"keys": keys, "via": via})
