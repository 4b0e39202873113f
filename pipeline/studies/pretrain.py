"""`attncache teacher pretrain`: make a teacher from nothing, on CPU, in minutes.

Two methods, one strategy object each: MAE (the paper's main teacher: mask 75 % of the patches,
reconstruct their normalised pixels through a small decoder, keep only the encoder) and supervised
(cross-entropy on a labelled split). Both read the shards once into memory as uint8 tensors (the
embedded data set is tiny) and augment on tensors with a seeded generator, so an epoch costs the
forward and backward passes and nothing else, and the same arguments give the same weights.

The output directory is a teacher directory: `config.json` names the timm model and its
arguments, `model.safetensors` holds the encoder's weights, so `precompute --teacher DIR`,
`train --teacher DIR --mode finetune` and `bench fidelity DIR` load it like any other teacher.
`pretrain.json` records the method, arguments, per-epoch loss, skipped samples and timings.

Each step is the student loop's (pipeline/train/update.py): the warmup + cosine schedule, the
gradient-norm clip (`optim.clip_grad`) and the EMA of the encoder (`optim.model_ema_decay`,
written beside the weights as `model_ema.safetensors` and evaluated with them).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torch import nn
from tqdm.auto import tqdm

from attncache.pipeline._util import atomic
from attncache.pipeline.data.shards import BadSample, decode_image, decode_sample, expand_shards, iter_shard
from attncache.pipeline.teacher.model import (TEACHER_CONFIG_FILE, TEACHER_WEIGHTS_FILE, _seeded_init,
    model_recipe_defaults)
from attncache.pipeline.train.loop import set_determinism
from attncache.pipeline.train.optim import OptimConfig
from attncache.pipeline.train.update import Updater

TINY_VIT = (("depth", 6), ("embed_dim", 64), ("img_size", 32), ("num_heads", 4), ("patch_size", 4))
REPORT_FILE = "pretrain.json"
EMA_WEIGHTS_FILE = "model_ema.safetensors"  # with optim.model_ema_decay: the EMA of the encoder


class PretrainError(ValueError):
    """The pre-training input cannot be used (no images, no labels for supervised, ...)."""


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ImageSet:
    """Decoded images [N, 3, S, S] uint8, labels (or None) and what was skipped, with why."""

    images_NCHW: torch.Tensor
    labels_N: torch.Tensor | None
    skipped: tuple[dict, ...]


def load_images(patterns: tuple[str, ...], image_size: int, labelled: bool, progress: bool = True) -> ImageSet:
    """Every decodable image of the shards, resized to the model's side; bad ones recorded, not lost."""
    images, labels, skipped = [], [], []
    urls = [u for p in patterns for u in expand_shards(p)]
    for url in tqdm(urls, desc="read shards", unit="shard", disable=not progress):
        for entry in iter_shard(url):
            try:
                if labelled:
                    image, label = decode_sample(url, entry)
                    labels.append(label)
                else:
                    image = decode_image(url, entry)
            except BadSample as exc:
                skipped.append({"url": url, "key": entry.key, "reason": exc.reason})
                continue
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), resample=3)  # bicubic
            images.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not images:
        raise PretrainError(f"no usable images in {', '.join(patterns)} ({len(skipped)} skipped)")
    return ImageSet(torch.stack(images), torch.tensor(labels) if labelled else None, tuple(skipped))


def random_resized_crop(images_BCHW: torch.Tensor, gen: torch.Generator, scale: tuple[float, float],
                        flip: bool = True) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip as one batched affine resample (float in, float out)."""
    B = images_BCHW.shape[0]
    area = torch.empty(B).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(B).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(B)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images_BCHW.device), list(images_BCHW.shape), align_corners=False)
    return F.grid_sample(images_BCHW, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------------------------------------- methods


class MaeDecoder(nn.Module):
    """MAE's light decoder: embed, put mask tokens back in place, a few blocks, predict patch pixels."""

    def __init__(self, embed_dim: int, num_patches: int, patch_pixels: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, latent_BKD: torch.Tensor, restore_BN: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent_BKD)
        prefix, kept = x[:, :1], x[:, 1:]
        B, N = restore_BN.shape
        filler = self.mask_token.expand(B, N - kept.shape[1], -1)
        full = torch.cat([kept, filler], dim=1)
        full = torch.gather(full, 1, restore_BN[..., None].expand(-1, -1, full.shape[-1]))
        x = torch.cat([prefix, full], dim=1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


def patchify(images_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    B, C, H, W = images_BCHW.shape
    x = images_BCHW.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


@dataclass(frozen=True)
class Mae:
    """Masked autoencoding: the encoder sees 1 - mask_ratio of the patches; loss on the masked ones."""

    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    name: str = "mae"
    labelled: bool = False

    def num_classes(self, labels_N: torch.Tensor | None) -> int:
        return 0  # the encoder only; a fine-tune gets a fresh head

    def extra_modules(self, model: nn.Module) -> nn.Module:
        patch = int(model.patch_embed.patch_size[0])
        return MaeDecoder(model.embed_dim, model.patch_embed.num_patches, patch * patch * 3,
                          self.decoder_dim, self.decoder_depth, self.decoder_heads)

    def loss(self, model: nn.Module, decoder: nn.Module, raw_BCHW: torch.Tensor, normed_BCHW: torch.Tensor,
             labels_B: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "cls_token", None) is None:
            raise PretrainError("MAE pre-training here expects a ViT with one class token and no registers")
        x = model.patch_embed(normed_BCHW)
        x = model._pos_embed(x)  # adds position embeddings, prepends the class token
        prefix, patches = x[:, :1], x[:, 1:]
        B, N, D = patches.shape
        keep = max(1, int(round(N * (1 - self.mask_ratio))))
        order_BN = torch.argsort(torch.rand(B, N, generator=gen), dim=1).to(patches.device)  # drawn on CPU: same masks on any device
        restore_BN = torch.argsort(order_BN, dim=1)
        kept = torch.gather(patches, 1, order_BN[:, :keep, None].expand(-1, -1, D))
        x = model.norm_pre(torch.cat([prefix, kept], dim=1))
        latent = model.norm(model.blocks(x))
        pred_BNP = decoder(latent, restore_BN)
        target_BNP = patchify(raw_BCHW, int(model.patch_embed.patch_size[0]))
        if self.norm_pix_loss:
            mean, var = target_BNP.mean(-1, keepdim=True), target_BNP.var(-1, keepdim=True)
            target_BNP = (target_BNP - mean) / (var + 1e-6).sqrt()
        masked_BN = torch.ones(B, N, device=patches.device)
        masked_BN[:, :keep] = 0
        masked_BN = torch.gather(masked_BN, 1, restore_BN)
        per_patch = ((pred_BNP - target_BNP) ** 2).mean(-1)
        return (per_patch * masked_BN).sum() / masked_BN.sum()


@dataclass(frozen=True)
class Supervised:
    """Cross-entropy with label smoothing on a labelled split; the head is kept in the checkpoint."""

    smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    name: str = "supervised"
    labelled: bool = True

    def num_classes(self, labels_N: torch.Tensor | None) -> int:
        return int(labels_N.max()) + 1

    def extra_modules(self, model: nn.Module) -> nn.Module:
        return nn.Identity()

    def loss(self, model, decoder, raw_BCHW, normed_BCHW, labels_B, gen) -> torch.Tensor:
        return F.cross_entropy(model(normed_BCHW), labels_B, label_smoothing=self.smoothing)


METHODS = {"mae": Mae(), "supervised": Supervised()}


# ---------------------------------------------------------------------------------------------- loop


@dataclass(frozen=True)
class PretrainConfig:
    data: tuple[str, ...]
    out: str
    method: Any = Mae()
    model: str = "vit_tiny_patch16_224"
    model_args: tuple[tuple[str, Any], ...] = TINY_VIT
    epochs: int = 40
    batch_size: int = 256
    optim: OptimConfig = OptimConfig(lr=1.5e-3, weight_decay=0.05, warmup_epochs=4.0, min_lr=1e-5,
                                     betas=(0.9, 0.95))
    num_classes: int | None = None  # supervised: default from the labels
    eval_data: tuple[str, ...] = ()
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class PretrainResult:
    out: str
    epochs: int
    steps: int
    seconds: float
    final_loss: float
    images: int
    skipped: int
    eval_top1: float | None
    eval_top1_ema: float | None = None  # with optim.model_ema_decay and eval data


def _normalise(images_BCHW: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    device = images_BCHW.device
    return (images_BCHW - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)


@torch.no_grad()
def top1(model: nn.Module, data: ImageSet, mean: tuple, std: tuple, batch_size: int = 512, device: str = "cpu") -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data.images_NCHW), batch_size):
        x = _normalise(data.images_NCHW[start:start + batch_size].to(device).float() / 255, mean, std)
        correct += int((model(x).argmax(-1).cpu() == data.labels_N[start:start + batch_size]).sum())
    model.train()
    return 100.0 * correct / len(data.images_NCHW)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Train, then write config.json + model.safetensors + pretrain.json into `config.out`."""
    set_determinism(config.threads)  # same arguments, same weights: on CUDA too
    method = config.method
    started = time.perf_counter()
    probe = timm.create_model(config.model, pretrained=False, **dict(config.model_args))
    defaults = model_recipe_defaults(probe, config.model)
    data = load_images(config.data, defaults.image_size, method.labelled, config.progress)
    classes = config.num_classes or method.num_classes(data.labels_N)
    args = dict(config.model_args) | {"num_classes": classes}
    with _seeded_init(config.seed):
        model = timm.create_model(config.model, pretrained=False, **args)
        decoder = method.extra_modules(model)
    trainable = nn.ModuleDict({"model": model, "decoder": decoder}).to(config.device)
    steps_per_epoch = max(1, len(data.images_NCHW) // config.batch_size)
    total, warmup = steps_per_epoch * config.epochs, int(round(steps_per_epoch * config.optim.warmup_epochs))
    updater = Updater.build(trainable, config.optim, total, warmup, ema_of=model)  # the EMA of the encoder
    gen = torch.Generator().manual_seed(config.seed)
    history, step = [], 0
    bar = tqdm(total=total, desc=f"pretrain {method.name}", unit="step", disable=not config.progress)
    for epoch in range(config.epochs):
        order = torch.randperm(len(data.images_NCHW), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            raw = random_resized_crop(data.images_NCHW[index].to(config.device).float() / 255, gen, method.crop_scale)
            labels = data.labels_N[index].to(config.device) if data.labels_N is not None else None

            def check(loss: torch.Tensor) -> None:
                if not torch.isfinite(loss):
                    raise PretrainError(f"loss became {loss.item()} at epoch {epoch} step {step}: lower --lr")

            _, loss = updater.step(step, lambda: method.loss(model, decoder, raw, _normalise(raw, defaults.mean,
                                                                                           defaults.std), labels, gen),
                                   check)
            losses.append(loss.item())
            step += 1
            bar.update(1)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - started, 1)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    ema = updater.ema
    eval_top1 = eval_top1_ema = None
    if config.eval_data and method.labelled:
        eval_set = load_images(config.eval_data, defaults.image_size, True, progress=False)
        eval_top1 = top1(model, eval_set, defaults.mean, defaults.std, device=config.device)
        if ema is not None:
            eval_top1_ema = top1(ema.module, eval_set, defaults.mean, defaults.std, device=config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(model.state_dict(), out / TEACHER_WEIGHTS_FILE, method.name)
    if ema is not None:  # beside the live weights, as `train` keeps it; point config.json's "weights" at it to use it
        _save_weights(ema.state, out / EMA_WEIGHTS_FILE, method.name)
    atomic.write_json(out / TEACHER_CONFIG_FILE, {"model": config.model, "model_args": args,
                                                  "weights": TEACHER_WEIGHTS_FILE, "method": method.name})
    seconds = time.perf_counter() - started
    report = {"method": asdict(method), "model": config.model, "model_args": args, "data": list(config.data),
              "epochs": config.epochs, "batch_size": config.batch_size, "steps": step, "seed": config.seed,
              "optim": asdict(config.optim), "images": len(data.images_NCHW), "skipped": list(data.skipped),
              "history": history, "eval_top1": eval_top1, "seconds": round(seconds, 1)}
    if ema is not None:
        report.update(eval_top1_ema=eval_top1_ema, ema_weights=EMA_WEIGHTS_FILE)
    atomic.write_json(out / REPORT_FILE, report)
    return PretrainResult(str(out), config.epochs, step, seconds, history[-1]["loss"] if history else float("nan"),
                          len(data.images_NCHW), len(data.skipped), eval_top1, eval_top1_ema)


def _save_weights(state: dict[str, torch.Tensor], path: Path, method: str) -> None:
    tmp = atomic.temp_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"method": method})
    atomic.commit_temp(tmp, path)
