"""Optimiser, schedule and EMA of the student, with timm's option names and MAE fine-tune semantics.

AdamW over timm's parameter groups (no weight decay on 1-D weights, biases, position embeddings
and tokens; layer-wise lr decay with timm's `param_groups_layer_decay` when `layer_decay` is set),
a per-step learning rate: linear warmup from 0, then half-cycle cosine down to `min_lr`, as the
paper's `util/lr_sched.py`, and an exponential moving average of the weights kept as plain tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None
    warmup_epochs: float = 5.0
    clip_grad: float | None = None
    model_ema_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip,
                                          layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return cfg.lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


class WeightEma:
    """EMA of every floating-point tensor of the state dict (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, avg in self.state.items():
            avg.lerp_(current[name].detach(), 1.0 - self.decay)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimiser state as flat named tensors (for safetensors) and the JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {f"optim.{index}.{name}": value.detach().clone().contiguous()
               for index, entry in state["state"].items() for name, value in entry.items()}
    return tensors, state["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
