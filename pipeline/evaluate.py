"""Top-1 / top-5 of a student on an eval split, with a small confusion summary.

Copy-mode students need the teacher's attention at evaluation too; it comes from an eval cache
(precompute with `--recipe eval`) or an online teacher, never silently from nowhere: a copy-mode
student without one is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.augment import Recipe, RecipeDefaults, parse_recipe
from pipeline.student import Strategy, TransferContext


def eval_recipe_like(train: Recipe) -> Recipe:
    """The deterministic eval recipe (resize, centre crop, normalize) with the train recipe's size,
    normalisation and interpolation, so a student sees eval images prepared as it was trained."""
    ops = {op.name: op.kwargs for op in train.ops}
    norm = ops["normalize"]
    interp = ops.get("rrc", {}).get("interpolation", "bicubic")
    defaults = RecipeDefaults(image_size=int(train.output_size), mean=tuple(norm["mean"]), std=tuple(norm["std"]),
                              interpolation=interp if interp != "random" else "bicubic")
    return parse_recipe("eval", defaults)


def normalisation(recipe: Recipe) -> dict:
    norm = next(op.kwargs for op in recipe.ops if op.name == "normalize")
    return {"image_size": recipe.output_size, "mean": [float(m) for m in norm["mean"]],
            "std": [float(s) for s in norm["std"]]}


def check_same_normalisation(train: Recipe, other: Recipe, where: str) -> None:
    a, b = normalisation(train), normalisation(other)
    if a != b:
        raise ValueError(f"{where}: its recipe prepares images differently from the training recipe "
                         f"(train {a}, eval {b}); precompute the eval cache with the same teacher normalisation")


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    samples: int
    confusion: list[list[int]]

    def to_json(self) -> dict:
        per_class = [row[i] / max(1, sum(row)) for i, row in enumerate(self.confusion)]
        pairs = sorted(((n, t, p) for t, row in enumerate(self.confusion) for p, n in enumerate(row) if t != p),
                       reverse=True)[:5]
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.samples,
                "per_class_top1": [round(a * 100, 2) for a in per_class],
                "most_confused": [{"true": t, "predicted": p, "count": n} for n, t, p in pairs if n],
                "confusion": self.confusion}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, strategy: Strategy, context: TransferContext, signal, loader,
                   device, num_classes: int, progress: bool = False) -> EvalResult:
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        context.set_teacher(signal(batch, device) if strategy.uses_teacher_at_eval else None)
        logits = model(batch["image"].to(device)).float()
        labels = batch["label"].to(device)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=-1).sum())
        total += len(labels)
        confusion += torch.bincount(labels.cpu() * num_classes + top[:, 0].cpu(),
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
    context.set_teacher(None)
    model.train(was_training)
    if total == 0:
        raise ValueError("the eval split holds no usable samples")
    return EvalResult(100.0 * correct1 / total, 100.0 * correct5 / total, loss_sum / total, total,
                      confusion.tolist())
