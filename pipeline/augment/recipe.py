"""Augmentation recipes whose randomness is drawn once, stored, and replayed bit for bit.

A recipe is a spec of named ops (`rrc|flip|randaug(n=2,m=9)|normalize|erase(p=0.25)`, or the
presets `train`, `train_mix` and `eval`). Op i of sample `key` in view `v` draws its parameters from
`sample_rng(seed, key, v, i)` into a fixed-length float64 vector; `apply` replays those vectors on
the raw image and never draws. Drawing depends only on the current image size, never on pixels.
Ops before `normalize` work on PIL images, `normalize` turns the image into a float tensor
[3, S, S], ops after it work on that tensor. The pairwise op `mix` (mixup/cutmix with a partner
from the same unit, before the teacher sees the image) comes last and needs the whole unit: here it
is the identity with zero params; pipeline/augment/mix.py draws, stores and replays it unit by unit.

This module holds the recipe as a whole (its parameter layout, drawing and replay, per-sample
randomness) and its entry points; the ops are in pipeline/augment/ops.py, the recipe text's grammar,
presets and order rules in pipeline/augment/spec.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from attncache.pipeline.augment.ops import OPS, RecipeDefaults
from attncache.pipeline.augment.spec import PRESETS, OpSpec, check_ops, freeze, parse_ops

__all__ = ["PRESETS", "OpSpec", "Recipe", "RecipeDefaults", "check_recipe_text", "key_hash", "parse_recipe", "sample_rng"]


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def sample_rng(seed: int, key: str, view: int, op_index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, key_hash(key), view, op_index]))


@dataclass(frozen=True)
class Recipe:
    ops: tuple[OpSpec, ...]

    def __post_init__(self):
        check_ops(self.ops)

    def to_json(self) -> list[dict]:
        return [{"op": op.name, "args": {k: list(v) if isinstance(v, tuple) else v for k, v in op.args}}
                for op in self.ops]

    @classmethod
    def from_json(cls, data: list[dict]) -> "Recipe":
        return cls(tuple(OpSpec(d["op"], tuple(sorted((k, freeze(v)) for k, v in d["args"].items())))
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


def check_recipe_text(spec: str) -> None:
    """Raise SpecError for a recipe that no teacher could take (unknown op, bad argument, wrong
    order), before a teacher is loaded; sizes and means are the teacher's, so any stand-in will do."""
    parse_recipe(spec, RecipeDefaults(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def parse_recipe(spec: str, defaults: RecipeDefaults) -> Recipe:
    """A preset name or ops joined by '|'; every argument is made explicit."""
    return Recipe(parse_ops(spec, defaults))
