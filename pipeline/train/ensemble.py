"""Ensembles of trained students: the paper's "attention distillation + fine-tune" ensemble.

The paper averages the predictions of an attention-distilled and a fine-tuned model and finds the
ensemble beats either, evidence that attention transfer learns features the fine-tuned model does
not. Here the class probabilities of each run are averaged per sample (joined on sample key, so a
different loader order cannot pair the wrong images) and scored against the labels.
"""
from __future__ import annotations

import torch

from attncache.pipeline.train.loader import epoch_loader
from attncache.pipeline.train.session import eval_stream, load_run


@torch.no_grad()
def predict_run(run: str, data: tuple[str, ...], cache: str | None, batch_size: int, workers: int,
                device: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Softmax probabilities and labels per sample key of one trained run on an eval split."""
    session, spec, _, _ = load_run(run, device)
    stream, signal = eval_stream(session, spec.student.num_classes, cache, data)
    strategy, model = session.mode.strategy, session.model.eval()
    probs, labels = {}, {}
    for batch in epoch_loader(stream, 0, batch_size, workers):
        session.context.set_teacher(signal(batch, device) if strategy.uses_teacher_at_eval else None)
        p = model(batch["image"].to(device)).float().softmax(dim=-1).cpu()
        for key, row, label in zip(batch["key"], p, batch["label"].tolist()):
            probs[key], labels[key] = row, label
    return probs, labels


def ensemble_top1(runs: list[str], data: tuple[str, ...], caches: list[str | None], batch_size: int = 256,
                  workers: int = 1, device: str = "cpu") -> dict:
    """Top-1 of each run alone and of the mean of their probabilities, on the same samples."""
    if len(runs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    predictions = [predict_run(r, data, c, batch_size, workers, device) for r, c in zip(runs, caches)]
    keys = sorted(predictions[0][1])
    for run, (_, labels) in zip(runs[1:], predictions[1:]):
        if sorted(labels) != keys:
            raise ValueError(f"{run} was evaluated on other samples than {runs[0]}")
    labels = torch.tensor([predictions[0][1][k] for k in keys])
    stacked = torch.stack([torch.stack([p[k] for k in keys]) for p, _ in predictions])  # [R, N, C]
    single = [100.0 * float((s.argmax(-1) == labels).float().mean()) for s in stacked]
    mean = 100.0 * float((stacked.mean(0).argmax(-1) == labels).float().mean())
    return {"runs": runs, "top1_each": single, "top1": mean, "samples": len(keys)}
