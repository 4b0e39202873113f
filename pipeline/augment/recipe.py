"""Augmentation recipes whose randomness is drawn once, stored, and replayed bit for bit.

A recipe is a spec of named ops (`rrc|flip|randaug(n=2,m=9)|normalize|erase(p=0.25)`, or the
presets `train`, `train_mix` and `eval`). Op i of sample `key` in view `v` draws its parameters from
`sample_rng(seed, key, v, i)` into a fixed-length float64 vector; `apply` replays those vectors on
the raw image and never draws. Drawing depends only on the current image size, never on pixels.
Ops before `normalize` work on PIL images, `normalize` turns the image into a float tensor
[3, S, S], ops after it work on that tensor. The pairwise op `mix` (mixup/cutmix with a partner
from the same unit, before the teacher sees the image) comes last and needs the whole unit: here it
is the identity with zero params; pipeline/augment/mix.py draws, stores and replays it unit by unit.
"""
from __future__ import annotations

import ast
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.augment import _randaug

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
INTERP_CODES = ("nearest", "bilinear", "bicubic")


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def sample_rng(seed: int, key: str, view: int, op_index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, key_hash(key), view, op_index]))


@dataclass(frozen=True)
class RecipeDefaults:
    """What the teacher's pretrained config provides."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"


# ---------------------------------------------------------------------------------------------- ops


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
PRESETS = {"train": "rrc(scale=(0.08,1.0))|flip|randaug(n=2,m=9,mstd=0.5,inc=1)|normalize|erase(p=0.25)",
           "eval": "resize|center_crop|normalize"}
PRESETS["train_mix"] = PRESETS["train"] + "|mix"


# ---------------------------------------------------------------------------------------------- recipe


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class OpSpec:
    name: str
    args: tuple[tuple[str, object], ...]

    @property
    def kwargs(self) -> dict:
        return dict(self.args)


@dataclass(frozen=True)
class Recipe:
    ops: tuple[OpSpec, ...]

    def __post_init__(self):
        _validate(self.ops)

    def to_json(self) -> list[dict]:
        return [{"op": op.name, "args": {k: list(v) if isinstance(v, tuple) else v for k, v in op.args}}
                for op in self.ops]

    @classmethod
    def from_json(cls, data: list[dict]) -> "Recipe":
        return cls(tuple(OpSpec(d["op"], tuple(sorted((k, _freeze(v)) for k, v in d["args"].items())))
                         for d in data))

    def param_layout(self) -> list[dict]:
        layout, offset = [], 0
        for op in self.ops:
            fields = OPS[op.name].fields(op.kwargs)
            layout.append({"op": op.name, "offset": offset, "length": len(fields), "fields": fields})
            offset += len(fields)
        return layout

    @property
    def num_params(self) -> int:
        return sum(len(OPS[op.name].fields(op.kwargs)) for op in self.ops)

    @property
    def output_size(self) -> int:
        size = None
        for op in self.ops:
            size = OPS[op.name].out_size(op.kwargs, size)
        return size

    @property
    def is_random(self) -> bool:
        return self.num_params > 0

    @property
    def has_pairs(self) -> bool:
        """True when the last op mixes pairs: replay then needs the whole unit (pipeline/augment/mix.py)."""
        return OPS[self.ops[-1].name].stage == "pair"

    def describe(self) -> str:
        return "|".join(op.name + ("(" + ",".join(f"{k}={v!r}" for k, v in op.args) + ")" if op.args else "")
                        for op in self.ops)

    def draw_and_apply(self, image: Image.Image, seed: int, key: str, view: int) -> tuple[np.ndarray, torch.Tensor]:
        """Params float64 [P] and the image float32 [3, S, S] the teacher sees, before any pair op (mix.py)."""
        parts = []
        for index, op in enumerate(self.ops):
            cls, args = OPS[op.name], op.kwargs
            width, height = (image.size if isinstance(image, Image.Image) else (image.shape[2], image.shape[1]))
            params = np.asarray(cls.draw(args, sample_rng(seed, key, view, index), width, height), dtype=np.float64)
            image = cls.apply(args, params, image)
            parts.append(params)
        return (np.concatenate(parts) if parts else np.zeros(0)), image

    def apply(self, params: np.ndarray, image: Image.Image) -> torch.Tensor:
        """Replay stored params: no randomness at all. A pair op is identity here (pipeline/augment/mix.py replays it)."""
        for op, part in zip(self.ops, self.param_layout()):
            image = OPS[op.name].apply(op.kwargs, params[part["offset"]:part["offset"] + part["length"]], image)
        return image


def _validate(ops: tuple[OpSpec, ...]) -> None:
    names = [op.name for op in ops]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise SpecError(f"unknown augmentation op {unknown[0]!r}; known: {sorted(OPS)}")
    if names.count("normalize") != 1:
        raise SpecError(f"a recipe needs exactly one 'normalize' op (got {names.count('normalize')}): {names}")
    pairs = [i for i, n in enumerate(names) if OPS[n].stage == "pair"]
    if len(pairs) > 1 or (pairs and pairs[0] != len(names) - 1):
        raise SpecError(f"op {names[pairs[0]]!r} mixes pairs of samples: at most one, as the last op: {names}")
    cut = names.index("normalize")
    late = [n for n in names[:cut] if OPS[n].stage == "tensor"]
    early = [n for n in names[cut + 1:] if OPS[n].stage == "pil"]
    if late:
        raise SpecError(f"op {late[0]!r} works on tensors and must come after 'normalize'")
    if early:
        raise SpecError(f"op {early[0]!r} works on PIL images and must come before 'normalize'")
    if not any(n in ("rrc", "center_crop") for n in names[:cut]):
        raise SpecError("a recipe must fix the output size with 'rrc' or 'center_crop' before 'normalize'")


def _parse_op(text: str, defaults: RecipeDefaults) -> OpSpec:
    text = text.strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    if name not in OPS:
        raise SpecError(f"unknown augmentation op {name!r}; known: {sorted(OPS)}")
    given = {}
    if rest:
        if not rest.endswith(")"):
            raise SpecError(f"op {name!r}: unbalanced parentheses in {text!r}")
        try:
            call = ast.parse(f"f({rest[:-1]})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
                raise SpecError(f"op {name!r}: arguments must be named, e.g. {name}(p=0.5)")
            given = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except SpecError:
            raise
        except (SyntaxError, ValueError) as exc:
            raise SpecError(f"op {name!r}: arguments {rest[:-1]!r} are not name=literal pairs, e.g. "
                            f"{name}(p=0.5) ({type(exc).__name__}: {exc})") from None
    op = OPS[name]
    bad = sorted(set(given) - set(op.defaults))
    if bad:
        raise SpecError(f"op {name!r} has no argument {bad[0]!r}; its arguments: {sorted(op.defaults)}")
    args = op.fill({**op.defaults, **given}, defaults)
    return OpSpec(name, tuple(sorted((k, _freeze(v)) for k, v in args.items())))


def check_recipe_text(spec: str) -> None:
    """Raise SpecError for a recipe that no teacher could take (unknown op, bad argument, wrong
    order), before a teacher is loaded; sizes and means are the teacher's, so any stand-in will do."""
    parse_recipe(spec, RecipeDefaults(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def parse_recipe(spec: str, defaults: RecipeDefaults) -> Recipe:
    """A preset name or ops joined by '|'; every argument is made explicit."""
    spec = PRESETS.get(spec.strip(), spec)
    parts = [p for p in spec.split("|") if p.strip()]
    if not parts:
        raise SpecError("empty augmentation recipe")
    return Recipe(tuple(_parse_op(p, defaults) for p in parts))
