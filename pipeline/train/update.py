"""One optimisation step, the same for student training (pipeline/train/loop.py) and teacher
pretraining (pipeline/studies/pretrain.py), so both honour every OptimConfig setting.

A step: the schedule sets the learning rate of step s, gradients are cleared, the caller's
forward gives the losses, the caller's check stops the run before a non-finite loss reaches the
weights, the caller's backward fills the gradients (the student loop sums them over ranks there),
then the gradient norm is clipped (`clip_grad`), the optimiser steps and the EMA
(`model_ema_decay`) follows the new weights. What differs between the two callers (the loss, how
a bad loss is reported, distributed gradient sums) is passed in; the order is fixed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import nn

from attncache.pipeline.train.optim import OptimConfig, WarmupCosine, WeightEma, build_optimizer

Losses = TypeVar("Losses")


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass
class Updater:
    """Optimiser, schedule, EMA and clip of one model. `model`: what is optimised and clipped;
    `ema_of`: what the EMA averages (the encoder alone when a pretrain decoder is trained beside it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    ema: WeightEma | None
    ema_of: nn.Module
    clip_grad: float | None

    @classmethod
    def build(cls, model: nn.Module, cfg: OptimConfig, total_steps: int, warmup_steps: int,
              ema_of: nn.Module | None = None) -> "Updater":
        optimizer = build_optimizer(model, cfg)
        schedule = WarmupCosine(optimizer, cfg, total_steps, warmup_steps)
        ema_of = model if ema_of is None else ema_of
        ema = WeightEma(ema_of, cfg.model_ema_decay) if cfg.model_ema_decay else None
        return cls(model, optimizer, schedule, ema, ema_of, cfg.clip_grad)

    def step(self, step: int, forward: Callable[[], Losses], check: Callable[[Losses], None],
             backward: Callable[[Losses], None] = _backward) -> tuple[float, Losses]:
        """Update `step` (0-based); returns its learning rate (of the peak group) and the losses."""
        self.schedule.step_update(step)
        self.optimizer.zero_grad(set_to_none=True)
        losses = forward()
        check(losses)
        backward(losses)
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.ema_of)
        return self.schedule.lr_at(step), losses
