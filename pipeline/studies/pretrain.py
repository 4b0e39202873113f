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
from attncache.pipeline.augment.recipe import parse_recipe
from attncache.pipeline.studies.pretrain_data import (ImageSet, PretrainError, holdout, load_images,  # noqa: F401
    random_resized_crop, recipe_batch)
from attncache.pipeline.teacher.model import (TEACHER_CONFIG_FILE, TEACHER_WEIGHTS_FILE, _seeded_init,
    model_recipe_defaults)
from attncache.pipeline.train.loop import set_determinism
from attncache.pipeline.train.optim import OptimConfig
from attncache.pipeline.train.update import Updater

TINY_VIT = (("depth", 6), ("embed_dim", 64), ("img_size", 32), ("num_heads", 4), ("patch_size", 4))
REPORT_FILE = "pretrain.json"
EMA_WEIGHTS_FILE = "model_ema.safetensors"  # with optim.model_ema_decay: the EMA of the encoder


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

    @torch.no_grad()
    def evaluate(self, model, decoder, data: ImageSet, mean: tuple, std: tuple, device: str, seed: int) -> dict:
        """The masked reconstruction loss on held-out images, with the same masks every epoch (drawn from
        the seed), so epochs compare: MAE's encoder has no head to take a top-1 of."""
        gen, losses, sizes = torch.Generator().manual_seed(seed), [], []
        for start in range(0, len(data.images_NCHW), 256):
            raw = data.images_NCHW[start:start + 256].to(device).float() / 255
            losses.append(float(self.loss(model, decoder, raw, _normalise(raw, mean, std), None, gen)))
            sizes.append(len(raw))
        return {"val_loss": float(np.average(losses, weights=sizes))}


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

    def evaluate(self, model, decoder, data: ImageSet, mean: tuple, std: tuple, device: str, seed: int) -> dict:
        """Top-1 (%) on held-out labelled images."""
        return {"val_top1": top1(model, data, mean, std, device=device)}


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
    batch_size: int = 64  # ~30 steps an epoch on 2,048 images: 256 left a few thousand images undertrained
    optim: OptimConfig = OptimConfig(lr=1.5e-3, weight_decay=0.05, warmup_epochs=4.0, min_lr=1e-5,
                                     betas=(0.9, 0.95))
    num_classes: int | None = None  # supervised: default from the labels
    eval_data: tuple[str, ...] = ()  # held-out shards, evaluated every `eval_every` epochs
    holdout: float = 0.0  # without eval_data: this fraction of `data` held out (drawn from the seed) instead
    eval_every: int = 1  # epochs between evaluations on the held-out split (and always after the last)
    recipe: str | None = None  # augmentation in the recipe grammar; None: the method's batched crop + flip
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
    history: tuple[dict, ...] = ()  # per epoch: loss, and val_top1 (supervised) or val_loss (mae) when evaluated


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


def _augmenter(config: PretrainConfig, defaults):
    """batch(index_B, epoch) -> (raw, normalised) images of the training set: the recipe's, or the
    method's batched crop and flip (drawn from the run's generator)."""
    if config.recipe is None:
        return None
    recipe = parse_recipe(config.recipe, defaults)
    if recipe.has_pairs:
        raise PretrainError(f"--recipe {config.recipe!r}: mix is not offered in pre-training; leave it out")
    if recipe.output_size != defaults.image_size:
        raise PretrainError(f"--recipe output size {recipe.output_size} != the model's input size {defaults.image_size}")
    return recipe


def _held_out(config: PretrainConfig, data: ImageSet, image_size: int, labelled: bool):
    if config.eval_data:
        return data, load_images(config.eval_data, image_size, labelled, progress=False)
    return holdout(data, config.holdout, config.seed)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Train, then write config.json + model.safetensors + pretrain.json into `config.out`."""
    set_determinism(config.threads)  # same arguments, same weights: on CUDA too
    method = config.method
    started = time.perf_counter()
    probe = timm.create_model(config.model, pretrained=False, **dict(config.model_args))
    defaults = model_recipe_defaults(probe, config.model)
    recipe = _augmenter(config, defaults)
    data = load_images(config.data, defaults.image_size, method.labelled, config.progress)
    data, held = _held_out(config, data, defaults.image_size, method.labelled)
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
            if recipe is None:
                raw = random_resized_crop(data.images_NCHW[index].to(config.device).float() / 255, gen,
                                          method.crop_scale)
                normed = _normalise(raw, defaults.mean, defaults.std)
            else:
                raw, normed = (t.to(config.device) for t in recipe_batch(recipe, data.images_NCHW[index], index,
                                                                        config.seed, epoch, defaults.mean, defaults.std))
            labels = data.labels_N[index].to(config.device) if data.labels_N is not None else None

            def check(loss: torch.Tensor) -> None:
                if not torch.isfinite(loss):
                    raise PretrainError(f"loss became {loss.item()} at epoch {epoch} step {step}: lower --lr")

            _, loss = updater.step(step, lambda: method.loss(model, decoder, raw, normed, labels, gen), check)
            losses.append(loss.item())
            step += 1
            bar.update(1)
        entry = {"epoch": epoch, "loss": float(np.mean(losses))}
        if held is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            entry.update(method.evaluate(model, decoder, held, defaults.mean, defaults.std, config.device, config.seed))
            model.train()
        history.append(dict(entry, seconds=round(time.perf_counter() - started, 1)))
        bar.set_postfix({k: f"{v:.4f}" if k.endswith("loss") else f"{v:.1f}" for k, v in entry.items() if k != "epoch"})
    bar.close()
    ema = updater.ema
    eval_top1 = eval_top1_ema = None
    if held is not None and method.labelled:
        eval_top1 = history[-1]["val_top1"] if history else top1(model, held, defaults.mean, defaults.std,
                                                                  device=config.device)
        if ema is not None:
            eval_top1_ema = top1(ema.module, held, defaults.mean, defaults.std, device=config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(model.state_dict(), out / TEACHER_WEIGHTS_FILE, method.name)
    if ema is not None:  # beside the live weights, as `train` keeps it; point config.json's "weights" at it to use it
        _save_weights(ema.state, out / EMA_WEIGHTS_FILE, method.name)
    atomic.write_json(out / TEACHER_CONFIG_FILE, {"model": config.model, "model_args": args,
                                                  "weights": TEACHER_WEIGHTS_FILE, "method": method.name})
    seconds = time.perf_counter() - started
    report = {"method": asdict(method), "model": config.model, "model_args": args, "data": list(config.data),
              "eval_data": list(config.eval_data), "holdout": config.holdout, "recipe": config.recipe,
              "epochs": config.epochs, "batch_size": config.batch_size, "steps": step, "seed": config.seed,
              "optim": asdict(config.optim), "images": len(data.images_NCHW), "skipped": list(data.skipped),
              "history": history, "eval_top1": eval_top1, "seconds": round(seconds, 1)}
    if ema is not None:
        report.update(eval_top1_ema=eval_top1_ema, ema_weights=EMA_WEIGHTS_FILE)
    atomic.write_json(out / REPORT_FILE, report)
    atomic.remove_safetensors_temps(out)  # of an earlier run into this folder killed inside a weights write
    return PretrainResult(str(out), config.epochs, step, seconds, history[-1]["loss"] if history else float("nan"),
                          len(data.images_NCHW), len(data.skipped), eval_top1, eval_top1_ema, tuple(history))


def _save_weights(state: dict[str, torch.Tensor], path: Path, method: str) -> None:
    tmp = atomic.temp_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"method": method})
    atomic.commit_temp(tmp, path)
