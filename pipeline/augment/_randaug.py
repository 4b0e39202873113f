"""RandAugment as timm's `rand-m{M}-mstd{S}-inc{0|1}`, with every random choice made explicit.

timm draws ops, apply flags, magnitudes and signs from Python's global `random`; here they are
drawn from a passed generator, recorded, and replayed. The image ops themselves are timm's (pure
functions of the image and their arguments); the level-to-argument formulas are timm's too, with
the random negation replaced by the recorded sign.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

LEVEL_DENOM = 10.0

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")

# ops whose argument timm negates with probability 1/2
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing"}


def level_to_args(name: str, level: float, sign: float) -> tuple:
    """timm's LEVEL_TO_ARG with `_randomly_negate` replaced by the recorded sign."""
    frac = level / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * frac * 30.0,)
    if name in ("ShearX", "ShearY"):
        return (sign * frac * 0.3,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * frac * 0.45,)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (frac * 1.8 + 0.1,)
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return (max(0.1, 1.0 + sign * frac * 0.9),)
    # Pillow >= 11 refuses posterize to 0 bits, which timm's formulas reach at the top (or
    # bottom) magnitude; 1 bit is the nearest image Pillow will make
    if name == "Posterize":
        return (max(1, int(frac * 4)),)
    if name == "PosterizeIncreasing":
        return (max(1, 4 - int(frac * 4)),)
    if name == "Solarize":
        return (min(256, int(frac * 256)),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(frac * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(frac * 110)),)
    raise KeyError(name)


def op_names(increasing: bool) -> tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS


def draw_slots(rng: np.random.Generator, n: int, m: float, mstd: float, p: float, mmax: float,
               increasing: bool) -> np.ndarray:
    """[n, 4]: op index, applied, magnitude, sign per slot (ops drawn with replacement, as timm)."""
    names = op_names(increasing)
    out = np.zeros((n, 4), dtype=np.float64)
    for slot in range(n):
        index = int(rng.integers(len(names)))
        applied = float(p >= 1.0 or rng.random() <= p)
        if mstd == float("inf"):
            magnitude = rng.uniform(0.0, m)
        elif mstd > 0:
            magnitude = rng.normal(m, mstd)
        else:
            magnitude = m
        magnitude = max(0.0, min(float(magnitude), mmax))
        sign = -1.0 if rng.random() > 0.5 else 1.0
        out[slot] = (index, applied, magnitude, sign)
    return out


def apply_slots(slots: np.ndarray, image: Image.Image, increasing: bool, fillcolor: tuple[int, int, int],
                resample: int) -> Image.Image:
    names = op_names(increasing)
    for index, applied, magnitude, sign in slots:
        if not applied:
            continue
        name = names[int(index)]
        args = level_to_args(name, float(magnitude), float(sign))
        image = NAME_TO_OP[name](image, *args, fillcolor=fillcolor, resample=resample)
    return image
