"""Top-1 / top-5 of a student on an eval split, with a small confusion summary.

Copy-mode students need the teacher's attention at evaluation too; it comes from an eval cache
(precompute with `--recipe eval`) or an online teacher, never silently from nowhere: a copy-mode
student without one is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from attncache.pipeline.augment.recipe import Recipe, RecipeDefaults, parse_recipe
from attncache.pipeline.train.student import Strategy, TransferContext


def eval_recipe_like(train: Recipe, crop_pct: float = RecipeDefaults.crop_pct,
                     interpolation: str = RecipeDefaults.interpolation) -> Recipe:
    """The deterministic eval recipe (resize, centre crop, normalize) with the train recipe's size,
    normalisation and interpolation, so a student sees eval images prepared as it was trained;
    `crop_pct` (resize to size / crop_pct, then crop) and `interpolation` (for a train recipe with
    no rrc or resize) are the pretrained config's where the caller knows them (a train recipe does
    not hold the crop)."""
    ops = {op.name: op.kwargs for op in train.ops}
    norm = ops["normalize"]
    interp = ops.get("rrc", ops.get("resize", {})).get("interpolation", interpolation)
    defaults = RecipeDefaults(image_size=int(train.output_size), mean=tuple(norm["mean"]), std=tuple(norm["std"]),
                              crop_pct=float(crop_pct), interpolation=interp if interp != "random" else "bicubic")
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


@dataclass
class EvalCounts:
    """What one rank counted on its part of the eval split; counts of ranks add up (`add`), so a
    split evaluation gathers to the same top-1 as one process."""

    correct1: int
    correct5: int
    total: int
    loss_sum: float
    confusion_CC: torch.Tensor  # int64 [true, predicted], on the CPU

    def as_tensor(self) -> torch.Tensor:
        """One float64 vector (counts exact below 2**53) for a single all-reduce."""
        head = torch.tensor([self.correct1, self.correct5, self.total, self.loss_sum], dtype=torch.float64)
        return torch.cat([head, self.confusion_CC.reshape(-1).double()])

    @classmethod
    def from_tensor(cls, t: torch.Tensor, num_classes: int) -> "EvalCounts":
        t = t.cpu()
        return cls(int(t[0]), int(t[1]), int(t[2]), float(t[3]),
                   t[4:].round().long().view(num_classes, num_classes))

    def result(self) -> EvalResult:
        if self.total == 0:
            raise ValueError("the eval split holds no usable samples")
        return EvalResult(100.0 * self.correct1 / self.total, 100.0 * self.correct5 / self.total,
                          self.loss_sum / self.total, self.total, self.confusion_CC.tolist())


@torch.no_grad()
def evaluate_counts(model: torch.nn.Module, strategy: Strategy, context: TransferContext, signal, loader,
                    device, num_classes: int, progress: bool = False) -> EvalCounts:
    """Counts over the loader's batches (possibly none: a rank with no eval units counts zeros)."""
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
    return EvalCounts(correct1, correct5, total, loss_sum, confusion)


def evaluate_model(model: torch.nn.Module, strategy: Strategy, context: TransferContext, signal, loader,
                   device, num_classes: int, progress: bool = False) -> EvalResult:
    return evaluate_counts(model, strategy, context, signal, loader, device, num_classes, progress).result()
