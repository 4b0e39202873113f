"""Pre-training's data: the shards read once into memory, a held-out split, and the two ways to augment.

The embedded data set is a few thousand small images, so `teacher pretrain` decodes every image
once into a uint8 tensor and augments per step. Augmentation is either the method's batched crop and
flip on tensors (`random_resized_crop`: the default, and the demo's; nothing but the generator
decides it), or a recipe in the grammar of `train --recipe` / `precompute --recipe`
(pipeline/augment/), drawn per sample from (seed, image index, epoch) like every other recipe here.
The held-out split (`holdout`) is drawn from the seed by its own generator, so the training
generator's draws are those of a run on the remaining images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.shards import BadSample, decode_image, decode_sample, expand_shards, iter_shard

HOLDOUT_STREAM = 0x401D  # folded into the seed: the held-out split's own random stream


class PretrainError(ValueError):
    """The pre-training input cannot be used (no images, no labels for supervised, ...)."""


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



def holdout(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """(training images, held-out images): `fraction` of the images, at least one, drawn from the seed."""
    if fraction <= 0:
        return data, None
    n = len(data.images_NCHW)
    count = max(1, int(round(n * fraction)))
    if count >= n:
        raise PretrainError(f"--holdout {fraction} leaves no image to train on ({n} images)")
    order = np.random.default_rng(np.random.SeedSequence([seed, HOLDOUT_STREAM])).permutation(n)
    held, kept = (torch.from_numpy(np.sort(part)) for part in (order[:count], order[count:]))

    def subset(index: torch.Tensor, skipped: tuple) -> ImageSet:
        return ImageSet(data.images_NCHW[index], None if data.labels_N is None else data.labels_N[index], skipped)

    return subset(kept, data.skipped), subset(held, ())


def recipe_batch(recipe: Recipe, images_BCHW: torch.Tensor, index_B: torch.Tensor, seed: int, epoch: int,
                 mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw [B, 3, S, S] in 0..1, normalised) of a batch through `recipe`, each image drawn from (seed,
    its index in the training set, the epoch): the same run gives the same pixels on any device."""
    normed = torch.stack([recipe.draw_and_apply(Image.fromarray(img.permute(1, 2, 0).numpy()), seed, str(int(i)),
                                                epoch)[1] for img, i in zip(images_BCHW, index_B)])
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return normed * std_t + mean_t, normed
