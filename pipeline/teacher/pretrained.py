"""A local checkpoint whose name says it was trained with other normalisation than the model name's.

Why: timm's pretrained config (mean, std, crop, interpolation) belongs to a *tag*
(`vit_large_patch16_224.mae`), and a bare name takes its default tag's
(`vit_large_patch16_224` -> `augreg_in21k_ft_in1k`, mean = std = 0.5). A teacher given as the bare
name plus an MAE checkpoint (ImageNet mean/std) would then be fed images normalised the wrong way:
it runs, its attention is just worse, and nothing says why. The checkpoint's file name is the only
hint there is (`mae_pretrain_vit_large.pth`), so when it names another tag of the same model whose
normalisation differs, one warning says so and gives both fixes. Only timm's registry is read (no
model is built, nothing is downloaded).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg

_WARNED: set[tuple[str, str]] = set()


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}


def checkpoint_tag(name: str, checkpoint: str) -> str | None:
    """The tag of `name` that the checkpoint's file name spells out (all its words; the longest wins)."""
    words = _words(Path(checkpoint).stem)
    tags = [full.split(".", 1)[1] for full in timm.list_pretrained(f"{name}.*")]
    matches = [t for t in tags if set(t.split("_")) <= words]
    return max(matches, key=lambda t: len(t.split("_")), default=None)


def normalisation_hint(name: str, checkpoint: str | None) -> str | None:
    """The warning for a bare `name` whose checkpoint names a tag with other mean/std, else None."""
    if not checkpoint or "." in name or not timm.is_model(name):
        return None
    tag = checkpoint_tag(name, checkpoint)
    if tag is None:
        return None
    default, tagged = get_pretrained_cfg(name), get_pretrained_cfg(f"{name}.{tag}")
    if default is None or tagged is None or (tuple(default.mean), tuple(default.std)) == \
            (tuple(tagged.mean), tuple(tagged.std)):
        return None
    mean, std = tuple(tagged.mean), tuple(tagged.std)
    return (f"attncache: warning: checkpoint {Path(checkpoint).name} looks like {name}.{tag} (mean {mean}, std {std}), "
            f"but --teacher {name} normalises with its default tag's (mean {tuple(default.mean)}, std "
            f"{tuple(default.std)}); give --teacher {name}.{tag}, or put normalize(mean={mean},std={std}) in --recipe")


def warn_tag_normalisation(name: str, checkpoint: str | None) -> None:
    """Print `normalisation_hint` on stderr, once per (name, checkpoint) in this process."""
    key = (name, str(checkpoint))
    if key in _WARNED:
        return
    hint = normalisation_hint(name, checkpoint)
    if hint:
        _WARNED.add(key)
        print(hint, file=sys.stderr)
