"""The augmentation ops: for each, its arguments, the float64 parameter vector it draws and how it
applies a drawn vector to an image.

An op draws from the generator it is handed (pipeline/augment/recipe.py's `sample_rng`) and the
current image size only, never from pixels; `apply` replays a vector and never draws, so a stored
vector reproduces the image bit for bit. `stage` says where an op may stand in a recipe: pil (before
normalize), convert (normalize), tensor (after) or pair (last, mixing samples: pipeline/augment/mix.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.augment import _randaug

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
INTERP_CODES = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class RecipeDefaults:
    """What the teacher's pretrained config provides."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"


class Op:
    """One named op. `stage` is pil (before normalize), convert (normalize), tensor (after) or pair (last)."""

    name = ""
    stage = "pil"
    defaults: dict = {}

    @staticmethod
    def fields(args: dict) -> list[str]:
        return []

    @staticmethod
    def fill(args: dict, d: RecipeDefaults) -> dict:
        return args

    @staticmethod
    def draw(args: dict, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        return np.zeros(0)

    @staticmethod
    def out_size(args: dict, size: int | None) -> int | None:
        return size


def _interp(args: dict) -> int:
    return INTERPOLATIONS[args["interpolation"]]


class RandomResizedCrop(Op):
    name, defaults = "rrc", {"size": None, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": None}

    @staticmethod
    def fields(args):
        return ["top", "left", "height", "width", "interpolation"]

    @staticmethod
    def fill(args, d):
        return dict(args, size=args["size"] or d.image_size, interpolation=args["interpolation"] or d.interpolation)

    @staticmethod
    def draw(args, rng, width, height):
        """torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
        area, (lo, hi) = width * height, args["scale"]
        log_ratio = (math.log(args["ratio"][0]), math.log(args["ratio"][1]))
        box = None
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
                break
        if box is None:  # centre crop at the nearest allowed ratio
            in_ratio = width / height
            if in_ratio < min(args["ratio"]):
                w, h = width, int(round(width / min(args["ratio"])))
            elif in_ratio > max(args["ratio"]):
                w, h = int(round(height * max(args["ratio"]))), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1))
        mode = args["interpolation"]
        if mode == "random":
            mode = ("bilinear", "bicubic")[int(rng.integers(2))]
        return np.array([*box, INTERP_CODES.index(mode)], dtype=np.float64)

    @staticmethod
    def apply(args, params, image):
        top, left, h, w, code = (int(v) for v in params)
        crop = image.crop((left, top, left + w, top + h))
        return crop.resize((args["size"], args["size"]), INTERPOLATIONS[INTERP_CODES[code]])

    @staticmethod
    def out_size(args, size):
        return args["size"]


class HorizontalFlip(Op):
    name, defaults = "flip", {"p": 0.5}

    @staticmethod
    def fields(args):
        return ["flipped"]

    @staticmethod
    def draw(args, rng, width, height):
        return np.array([float(rng.random() < args["p"])])

    @staticmethod
    def apply(args, params, image):
        return image.transpose(Image.FLIP_LEFT_RIGHT) if params[0] else image


class ColorJitter(Op):
    name, defaults = "jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0}

    @staticmethod
    def fields(args):
        return ["brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3"]

    @staticmethod
    def fill(args, d):
        """torchvision refuses a hue factor outside [-0.5, 0.5] only when one is drawn there, mid-job:
        refuse the range here, before any teacher runs."""
        for k in ("brightness", "contrast", "saturation"):
            if not (isinstance(args[k], (int, float)) and 0 <= args[k] < float("inf")):
                raise SpecError(f"jitter: {k}={args[k]!r} must be a finite number >= 0")
        if not (isinstance(args["hue"], (int, float)) and 0 <= args["hue"] <= 0.5):
            raise SpecError(f"jitter: hue={args['hue']!r} must be in [0, 0.5] (a hue shift is a fraction of the "
                            "colour wheel either way)")
        return args

    @staticmethod
    def draw(args, rng, width, height):
        factors = [rng.uniform(max(0.0, 1 - args[k]), 1 + args[k]) for k in ("brightness", "contrast", "saturation")]
        hue = rng.uniform(-args["hue"], args["hue"])
        return np.array([*factors, hue, *rng.permutation(4)], dtype=np.float64)

    @staticmethod
    def apply(args, params, image):
        import torchvision.transforms.functional as TF

        adjust = (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                  ("saturation", TF.adjust_saturation), ("hue", TF.adjust_hue))
        for index in params[4:].astype(int):
            name, fn = adjust[index]
            if args[name] > 0:
                image = fn(image, float(params[index]))
        return image


class RandAugment(Op):
    name = "randaug"
    defaults = {"n": 2, "m": 9.0, "mstd": 0.5, "p": 0.5, "inc": 1, "mmax": 10.0, "mean": None, "interpolation": None}

    @staticmethod
    def fields(args):
        return [f"{f}{i}" for i in range(args["n"]) for f in ("op", "applied", "magnitude", "sign")]

    @staticmethod
    def fill(args, d):
        return dict(args, mean=args["mean"] or tuple(d.mean), interpolation=args["interpolation"] or d.interpolation)

    @staticmethod
    def draw(args, rng, width, height):
        return _randaug.draw_slots(rng, args["n"], args["m"], args["mstd"], args["p"], args["mmax"],
                                   bool(args["inc"])).reshape(-1)

    @staticmethod
    def apply(args, params, image):
        fill = tuple(int(round(c * 255)) for c in args["mean"])
        resample = INTERPOLATIONS.get(args["interpolation"], Image.BICUBIC)
        return _randaug.apply_slots(params.reshape(-1, 4), image, bool(args["inc"]), fill, resample)


class Resize(Op):
    name, defaults = "resize", {"size": None, "interpolation": None}

    @staticmethod
    def fill(args, d):
        return dict(args, size=args["size"] or math.floor(d.image_size / d.crop_pct),
                    interpolation=args["interpolation"] or d.interpolation)

    @staticmethod
    def apply(args, params, image):
        """Shorter side to `size`, as torchvision's Resize(int)."""
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(args["size"] * long / short)
        size = (args["size"], new_long) if w <= h else (new_long, args["size"])
        return image.resize(size, _interp(args))


class CenterCrop(Op):
    name, defaults = "center_crop", {"size": None}

    @staticmethod
    def fill(args, d):
        return dict(args, size=args["size"] or d.image_size)

    @staticmethod
    def apply(args, params, image):
        import torchvision.transforms.functional as TF

        return TF.center_crop(image, [args["size"], args["size"]])

    @staticmethod
    def out_size(args, size):
        return args["size"]


class Normalize(Op):
    name, stage, defaults = "normalize", "convert", {"mean": None, "std": None}

    @staticmethod
    def fill(args, d):
        return dict(args, mean=args["mean"] or tuple(d.mean), std=args["std"] or tuple(d.std))

    @staticmethod
    def apply(args, params, image):
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
        mean = torch.tensor(args["mean"], dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(args["std"], dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


class RandomErasing(Op):
    name, stage, defaults = "erase", "tensor", {"p": 0.25, "scale": (0.02, 1 / 3), "ratio": (0.3, 3.3)}

    @staticmethod
    def fields(args):
        return ["applied", "top", "left", "height", "width", "noise_seed"]

    @staticmethod
    def draw(args, rng, width, height):
        """timm's RandomErasing(mode='pixel', max_count=1); the noise comes from a stored seed."""
        if rng.random() > args["p"]:
            return np.zeros(6)
        log_ratio = (math.log(args["ratio"][0]), math.log(args["ratio"][1]))
        for _ in range(10):
            target = rng.uniform(*args["scale"]) * width * height
            aspect = math.exp(rng.uniform(*log_ratio))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                return np.array([1.0, top, left, h, w, float(rng.integers(0, 2 ** 53))])
        return np.zeros(6)

    @staticmethod
    def apply(args, params, image):
        applied, top, left, h, w, noise_seed = (int(v) for v in params)
        if not applied:
            return image
        noise = np.random.default_rng(noise_seed).standard_normal((image.shape[0], h, w), dtype=np.float32)
        out = image.clone()
        out[:, top:top + h, left:left + w] = torch.from_numpy(noise)
        return out


class Mix(Op):
    """timm's Mixup(mode='elem') with a partner from the same unit, drawn and replayed unit by unit
    in pipeline/augment/mix.py. Per sample it is the identity with params 0 (`applied` = 0)."""

    name, stage = "mix", "pair"
    defaults = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}
    fields = staticmethod(lambda args: ["applied", "partner", "lam", "cutmix", "top", "left", "height", "width"])
    draw = staticmethod(lambda args, rng, width, height: np.zeros(8))
    apply = staticmethod(lambda args, params, image: image)

    @staticmethod
    def fill(args, d):
        if args["mixup_alpha"] <= 0 and args["cutmix_alpha"] <= 0:
            raise SpecError("op 'mix' needs mixup_alpha > 0 or cutmix_alpha > 0")
        return args


OPS: dict[str, type[Op]] = {op.name: op for op in (RandomResizedCrop, HorizontalFlip, ColorJitter, RandAugment,
                                                    Resize, CenterCrop, Normalize, RandomErasing, Mix)}
