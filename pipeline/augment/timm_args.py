"""timm's augmentation options (`--aa`, `--reprob`, `--hflip`, `--scale`, `--color-jitter`) as edits
of a recipe text, so a user's timm habits reach the very ops our recipes draw and replay.

Why edits of the text, not of parsed ops: the text is what a run records (`TrainConfig.recipe`),
and the same text typed as `--recipe` must be the same run. So each option rewrites or inserts
one op (the others are left as typed), and a test can spell the result out. The values keep timm's
meanings: a value of 0 adds no transform in timm, so here it removes the op; `--aa` is parsed as
timm's `rand_augment_transform` reads it, with timm's defaults for the sections not given (m 10,
n 2, mstd 0, p 0.5, inc 0, mmax 10), so `rand-m9` is not our preset's `mstd=0.5,inc=1`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.augment.spec import PRESETS, split_op

# where an op goes when an option inserts it: timm's transform order
# (crop, flip, colour jitter or auto-augment, to tensor + normalise, random erasing, mix)
_RANK = {"rrc": 0, "resize": 0, "center_crop": 0, "flip": 1, "jitter": 2, "randaug": 3, "normalize": 4,
         "erase": 5, "mix": 6}
_AA_KEYS = {"m": ("m", int), "n": ("n", int), "mstd": ("mstd", float), "p": ("p", float), "inc": ("inc", int),
            "mmax": ("mmax", float)}
_AA_FORMS = ("rand-m{M}[-n{N}][-mstd{S}][-p{P}][-inc{0|1}][-mmax{X}], or none")


@dataclass(frozen=True)
class TimmAugment:
    """The timm augmentation options given (None: not given, the recipe's op stays as it is)."""

    aa: str | None = None
    reprob: float | None = None
    hflip: float | None = None
    scale: tuple[float, float] | None = None
    color_jitter: float | None = None

    def given(self) -> list[str]:
        """The options given, as the user typed them (for a refusal naming them)."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) is not None]


def parse_rand_augment(text: str) -> dict:
    """timm's `rand-m9-mstd0.5-inc1` as the randaug op's arguments; what the op cannot draw is refused."""
    parts = text.strip().split("-")
    if parts[0] != "rand":
        raise SpecError(f"--aa {text!r}: only timm's RandAugment strings map onto the recipe's randaug op "
                        f"({_AA_FORMS}); AutoAugment policies (original, v0, 3a) and AugMix cannot be expressed")
    args = {"m": 10, "n": 2, "mstd": 0.0, "p": 0.5, "inc": 0}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if part.startswith("t") or not match or match.group(1) not in _AA_KEYS:
            raise SpecError(f"--aa {text!r}: section {part!r} cannot be expressed by the recipe's randaug op "
                            f"(forms: {_AA_FORMS}; transform sets -t... are not supported)")
        key, cast = _AA_KEYS[match.group(1)]
        try:
            args[key] = cast(match.group(2))
        except ValueError:
            raise SpecError(f"--aa {text!r}: {match.group(2)!r} in section {part!r} is not a number") from None
    if args["mstd"] > 100:
        raise SpecError(f"--aa {text!r}: mstd > 100 (timm: uniform magnitudes) cannot be stored in a recipe; "
                        "give a finite mstd <= 100")
    if args["inc"] not in (0, 1) or args["n"] < 0 or not 0 <= args["p"] <= 1:
        raise SpecError(f"--aa {text!r}: inc is 0 or 1, n >= 0 and p in [0, 1]")
    return args


def _emit(name: str, args: dict) -> str:
    if not args:
        return name
    return name + "(" + ",".join(f"{k}={args[k]!r}" for k in sorted(args)) + ")"


class _Ops:
    """The recipe's ops as (name, typed args, text); edited ops are re-emitted, the others kept."""

    def __init__(self, text: str):
        self.items = []
        for part in (p.strip() for p in text.split("|") if p.strip()):
            name, given = split_op(part)
            self.items.append([name, given, part])

    def find(self, name: str) -> list | None:
        return next((item for item in self.items if item[0] == name), None)

    def set(self, name: str, args: dict, replace: bool = False) -> None:
        """Set `args` on op `name` (all its typed args with `replace`), inserting it where timm has it."""
        item = self.find(name)
        if item is None:
            at = next((i for i, it in enumerate(self.items) if _RANK.get(it[0], 0) > _RANK[name]), len(self.items))
            self.items.insert(at, [name, dict(args), _emit(name, args)])
            return
        item[1] = dict(args) if replace else {**item[1], **args}
        item[2] = _emit(name, item[1])

    def drop(self, name: str) -> None:
        self.items = [item for item in self.items if item[0] != name]

    def text(self) -> str:
        return "|".join(item[2] for item in self.items)


def apply_timm_augment(recipe: str, aug: TimmAugment) -> str:
    """The recipe text with timm's options applied (the text unchanged when none is given)."""
    if not aug.given():
        return recipe
    ops = _Ops(PRESETS.get(recipe.strip(), recipe))
    if aug.scale is not None:
        if ops.find("rrc") is None:
            raise SpecError(f"--scale: the recipe {recipe!r} has no rrc op whose scale it would set")
        ops.set("rrc", {"scale": tuple(float(v) for v in aug.scale)})
    for name, value, args in (("flip", aug.hflip, lambda v: {"p": v}),
                              ("jitter", aug.color_jitter, lambda v: {k: v for k in ("brightness", "contrast",
                                                                                     "saturation")}),
                              ("erase", aug.reprob, lambda v: {"p": v})):
        if value is not None:
            ops.set(name, args(float(value))) if value > 0 else ops.drop(name)
    if aug.aa is not None:
        if aug.aa.strip().lower() in ("none", ""):
            ops.drop("randaug")
        else:
            keep = {k: v for k, v in (ops.find("randaug") or [None, {}])[1].items() if k in ("mean", "interpolation")}
            ops.set("randaug", {**keep, **parse_rand_augment(aug.aa)}, replace=True)
    return ops.text()
