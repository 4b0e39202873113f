"""Optimiser, schedule and EMA of the student (and of a pre-trained teacher), from timm's pieces.

- Optimiser: `timm.optim.create_optimizer_v2(..., "adamw")`: timm's parameter groups (no weight
  decay on 1-D weights, biases and the model's `no_weight_decay()` names: position embeddings and
  tokens), layer-wise lr decay (`param_groups_layer_decay`, BEiT/MAE) when `layer_decay` is set.
  Every group carries an `lr_scale` (1.0 without layer decay) that the schedule multiplies in.
- Schedule: `timm.scheduler.CosineLRScheduler`, stepped once per optimiser update
  (`t_in_epochs=False`, `warmup_prefix=True`): linear warmup from 0 (or timm's `--warmup-lr`, the
  peak group's first lr) over `warmup_steps`, then a
  half cycle of cosine over the remaining steps down to `min_lr`. timm's class drives the groups
  (`lr_scale`, `step_update`, `state_dict`); the two formulas are the MAE paper's
  `util/lr_sched.py`, written in `WarmupCosine._get_lr`, because timm's round differently and a run
  must give the same weights as before this class (same run, same bits):
    warmup  timm `0 + t * (lr / w)`            paper `lr * t / w`          (~1/3 of steps differ by 1 ulp)
    cosine  timm `pi * t ** 1.0 / T ** 1.0`    paper `pi * (t / T)`        (~1/5 of steps differ by 1 ulp)
  The schedule is stateless: the loop sets the lr of step s (0-based) before that step's update,
  so a resumed run needs no scheduler state in its checkpoint.
- EMA: `timm.utils.ModelEmaV3` over every floating-point tensor of the state dict, with the
  per-tensor `lerp_` (foreach=False: the very kernel of the hand-written EMA it replaces, on every
  device) and no stochastic rounding (its generator state would have to be checkpointed to resume
  bit for bit). `WeightEma.state` is what checkpoints save and load.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
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
    warmup_lr: float = 0.0  # timm --warmup-lr: the warmup's first lr (0: the paper's warmup from 0)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay, betas=cfg.betas)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", 1.0)
    return optimizer


class WarmupCosine(CosineLRScheduler):
    """Linear warmup from 0, then half-cycle cosine to `min_lr`, per update (see the module docstring).
    Build it right after the optimiser: it reads the peak lr from the groups (`initial_lr`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int):
        cosine = logging.getLogger(CosineLRScheduler.__module__)
        level = cosine.level
        cosine.setLevel(logging.ERROR)  # its "no effect when t_initial = 1" note: the loop warns itself
        try:
            super().__init__(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=cfg.min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
        finally:
            cosine.setLevel(level)
        for group in optimizer.param_groups:  # peaks are read (base_values); keep checkpoints' groups as before
            group.pop(self._initial_param_group_field, None)
        self.warmup_lr = cfg.warmup_lr

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            if self.warmup_lr:  # timm's warmup from --warmup-lr; from 0 the paper's formula, bit for bit as before
                return [self.warmup_lr + (peak - self.warmup_lr) * t / self.warmup_t for peak in self.base_values]
            return [peak * t / self.warmup_t for peak in self.base_values]
        progress = min(1.0, (t - self.warmup_t) / self.t_initial)
        return [self.lr_min + (peak - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
                for peak in self.base_values]

    def lr_at(self, step: int) -> float:
        """The peak-group learning rate of step `step` (what metrics record; groups get it x lr_scale)."""
        return self._get_lr(step)[0]


class WeightEma(ModelEmaV3):
    """EMA of every floating-point tensor of the state dict (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, decay=decay, foreach=False, stochastic_rounding=False)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by state-dict name (views of the EMA copy: clone to keep)."""
        return {k: v for k, v in self.module.state_dict().items() if v.is_floating_point()}

    @state.setter
    def state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state
        if set(tensors) != set(own):
            odd = sorted(set(own) ^ set(tensors))
            raise KeyError(f"EMA tensors missing or unexpected: {', '.join(odd[:4])}")
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(tensors[name])


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
