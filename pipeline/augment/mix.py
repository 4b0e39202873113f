"""Mixup/CutMix within a unit, drawn at precompute time so the teacher's attention is on the mixed image.

The paper (and timm's Mixup) mixes the batch before the teacher sees it. attncache runs the
teacher once per (sample, view), so each sample's mix is drawn once and stored, with its partner
taken from the same unit (input shard x view) instead of from a batch: a partner depends only on
(seed, key, view) and the unit's usable positions, never on batch boundaries, workers or retries.
The trainer rebuilds the mixed image from the partner's replayed image (`replay_unit`) and the
mixed target from the stored weight (`mix_targets`). Precompute mixes through `mix_unit` too, so
both sides run the same float ops in the same order.

A row of the `mix` op's params (MIX_FIELDS): `applied` (0/1); `partner`, the partner's position in
the shard (tar order); `lam`, the weight of the sample itself (for cutmix 1 - box area / image
area, timm's `correct_lam=True`); `cutmix` (0 mixup, 1 cutmix); `top, left, height, width`, the box
pasted from the partner (cutmix only). A row with `applied = 0` is the identity whatever the rest
holds (per-sample drawing in pipeline/augment/recipe.py leaves the whole row at 0).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from attncache.pipeline.augment.recipe import Recipe, sample_rng

MIX_FIELDS = ("applied", "partner", "lam", "cutmix", "top", "left", "height", "width")


def mix_columns(recipe: Recipe) -> slice:
    """Where the mix op's params sit in a row of `aug` (the last op's block)."""
    if not recipe.has_pairs:
        raise ValueError(f"recipe {recipe.describe()!r} has no pair op")
    part = recipe.param_layout()[-1]
    return slice(part["offset"], part["offset"] + part["length"])


# ---------------------------------------------------------------------------------------------- drawing


def _box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """timm's rand_bbox (margin 0) around a drawn centre, clipped to the image: (top, left, h, w)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    return top, left, bottom - top, right - left


def _draw_one(args: dict, rng: np.random.Generator, position: int, pool: np.ndarray, size: int) -> list[float]:
    """One sample's row. Draws come in a fixed order (apply, switch, partner, centre, lam), so
    changing `prob` or `switch_prob` moves no other draw; a lone sample is never mixed."""
    applied = rng.random() < args["prob"]
    switch = rng.random() < args["switch_prob"]
    others = pool[pool != position]
    if not applied or len(others) == 0:
        return [0.0, float(position), 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    partner = int(others[rng.integers(len(others))])
    cy, cx = int(rng.integers(size)), int(rng.integers(size))
    cutmix = args["cutmix_alpha"] > 0 and (args["mixup_alpha"] <= 0 or switch)
    alpha = args["cutmix_alpha"] if cutmix else args["mixup_alpha"]
    lam = float(rng.beta(alpha, alpha))
    if not cutmix:
        return [1.0, float(partner), lam, 0.0, 0.0, 0.0, 0.0, 0.0]
    top, left, h, w = _box(size, size, lam, cy, cx)
    return [1.0, float(partner), 1.0 - h * w / float(size * size), 1.0, top, left, h, w]


def draw_mix(recipe: Recipe, seed: int, view: int, keys: Sequence[str], positions: Sequence[int]) -> np.ndarray:
    """Mix params [b, 8] of a unit's usable samples, row i for (keys[i], positions[i]).

    Drawn from `sample_rng(seed, key, view, index of the mix op)`; the partner is uniform among the
    other given positions (taken sorted, so their order does not matter). Give every usable sample
    of the unit and only those: a skipped sample must never be a partner."""
    if len(keys) != len(positions) or len(set(positions)) != len(positions):
        raise ValueError("draw_mix needs one key per position and distinct positions")
    mix_columns(recipe)  # refuses a recipe without a pair op
    args, index = recipe.ops[-1].kwargs, len(recipe.ops) - 1
    pool = np.sort(np.asarray(positions, dtype=np.int64))
    rows = [_draw_one(args, sample_rng(seed, key, view, index), int(p), pool, recipe.output_size)
            for key, p in zip(keys, positions)]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(MIX_FIELDS))


def fill_mix_params(recipe: Recipe, aug_BP: np.ndarray, mix_B8: np.ndarray) -> np.ndarray:
    """A copy of the per-sample params [B, P] with the mix op's columns set to `mix_B8`."""
    out = np.array(aug_BP, dtype=np.float64, copy=True)
    out[:, mix_columns(recipe)] = mix_B8
    return out


def draw_and_mix_unit(recipe: Recipe, seed: int, view: int, keys_by_position: Mapping[int, str],
                      aug_by_position: Mapping[int, np.ndarray], base_by_position: Mapping[int, torch.Tensor]
                      ) -> tuple[dict[int, np.ndarray], dict[int, torch.Tensor]]:
    """The drawing twin of `replay_unit`, shared by precompute and the cache-less trainer: given a
    unit's usable samples with their per-sample params drawn and images augmented, draw the mix
    rows among them, fill them into the params, and mix. Returns (params, mixed images) by position."""
    positions = sorted(aug_by_position)
    mix_B8 = draw_mix(recipe, seed, view, [keys_by_position[p] for p in positions], positions)
    filled_BP = fill_mix_params(recipe, np.stack([aug_by_position[p] for p in positions]), mix_B8)
    aug = {p: filled_BP[i] for i, p in enumerate(positions)}
    return aug, mix_unit(recipe, base_by_position, aug)


# ---------------------------------------------------------------------------------------------- applying


def _mix_one(row_8: np.ndarray, x_CHW: torch.Tensor, partner_CHW: torch.Tensor) -> torch.Tensor:
    """timm's per-element mix: a weighted sum (mixup) or the partner's box pasted in (cutmix)."""
    if not row_8[0]:
        return x_CHW
    if row_8[3]:
        top, left, h, w = (int(v) for v in row_8[4:8])
        out = x_CHW.clone()
        out[:, top:top + h, left:left + w] = partner_CHW[:, top:top + h, left:left + w]
        return out
    lam = float(row_8[2])
    return x_CHW * lam + partner_CHW * (1.0 - lam)


def apply_mix(recipe: Recipe, aug_BP: np.ndarray, positions_B: Sequence[int],
              base_BCHW: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mixed images [B, C, H, W] from the unmixed replayed images of ALL usable samples of a unit
    (base_BCHW[i] is the sample at positions_B[i]); partners are looked up by position. Mixing
    reads only the unmixed images, so the order of rows does not change the result."""
    if not recipe.has_pairs:
        return base_BCHW if isinstance(base_BCHW, torch.Tensor) else torch.stack(list(base_BCHW))
    mix_B8 = np.asarray(aug_BP)[:, mix_columns(recipe)]
    index_of = {int(p): i for i, p in enumerate(positions_B)}
    out = []
    for i, (position, row) in enumerate(zip(positions_B, mix_B8)):
        partner = index_of.get(int(row[1])) if row[0] else i
        if partner is None:
            raise KeyError(f"the sample at position {position} mixes with position {int(row[1])}, which is not among "
                           f"the given samples: replay needs every usable sample of the unit")
        out.append(_mix_one(row, base_BCHW[i], base_BCHW[partner]))
    return torch.stack(out)


def mix_unit(recipe: Recipe, base_by_position: Mapping[int, torch.Tensor],
             aug_by_position: Mapping[int, np.ndarray]) -> dict[int, torch.Tensor]:
    """The one mixing path of precompute and replay: unmixed [C, H, W] images in, mixed ones out."""
    if not recipe.has_pairs:
        return dict(base_by_position)
    positions = sorted(base_by_position)
    aug_BP = np.stack([np.asarray(aug_by_position[p])[:recipe.num_params] for p in positions])
    mixed_BCHW = apply_mix(recipe, aug_BP, positions, [base_by_position[p] for p in positions])
    return {p: mixed_BCHW[i] for i, p in enumerate(positions)}


def replay_unit(recipe: Recipe, images_by_position: Mapping[int, Image.Image],
                aug_by_position: Mapping[int, np.ndarray]) -> dict[int, torch.Tensor]:
    """What the teacher saw, for every usable sample of a unit: per-sample ops replayed with
    `Recipe.apply`, then the mix. Pass every valid slot of the unit (any may be a partner)."""
    base = {p: recipe.apply(np.asarray(aug_by_position[p])[:recipe.num_params], image)
            for p, image in images_by_position.items()}
    return mix_unit(recipe, base, aug_by_position)


# ---------------------------------------------------------------------------------------------- targets


def _smoothed_one_hot(labels_B: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """timm's one_hot(on = 1 - smoothing + smoothing / C, off = smoothing / C), float64 [B, C]."""
    off = smoothing / num_classes
    out = np.full((len(labels_B), num_classes), off, dtype=np.float64)
    out[np.arange(len(labels_B)), labels_B] = 1.0 - smoothing + off
    return out


def mix_targets(recipe: Recipe, aug_BP: np.ndarray, positions_B: Sequence[int], labels_B,
                label_by_position: Mapping[int, int], num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets float32 [B, C]: lam * y_self + (1 - lam) * y_partner with timm's smoothing, the
    plain smoothed one-hot when the recipe has no mix or a row is not applied. `label_by_position`
    maps unit positions to labels (partners may lie outside the batch)."""
    labels = np.asarray(labels_B, dtype=np.int64).reshape(-1)
    own = _smoothed_one_hot(labels, num_classes, smoothing)
    if not recipe.has_pairs:
        return torch.from_numpy(own.astype(np.float32))
    mix_B8 = np.asarray(aug_BP)[:, mix_columns(recipe)]
    applied = mix_B8[:, 0] > 0
    if np.any(applied & (mix_B8[:, 1] == np.asarray(positions_B))):
        raise ValueError("a mix row names its own position as partner: aug rows and positions are misaligned")
    partner_labels = np.array([label_by_position[int(row[1])] if row[0] else own_label
                               for row, own_label in zip(mix_B8, labels)], dtype=np.int64)
    lam = np.where(applied, mix_B8[:, 2], 1.0)[:, None]
    mixed = own * lam + _smoothed_one_hot(partner_labels, num_classes, smoothing) * (1.0 - lam)
    return torch.from_numpy(mixed.astype(np.float32))
