"""The embedded default data set: one marked shape among decoys and blobs, written as webdataset shards.

What matters in these images is where to look. The class is the shape of the one *target* object:
outlined, filled with a stripe texture, at a random position, scale, colour and turn. Around it sit
decoys (flat shapes of other classes, no outline, no texture) and soft blobs on a noisy gradient
background. A model that pools over the whole image sees several shapes; one that learned to attend
to the textured, outlined object sees the answer. That is what a pre-trained teacher's attention
carries and what a student trained from scratch on a small budget has to discover.

Splits: `train` and `val` (labelled), `pool` (unlabelled, for MAE pre-training: images only, no
`.cls` member), and the `shifted` variant of each (`shifted-pool`, `shifted-train`, `shifted-val`):
the same classes rendered in another style (striped backgrounds, muted palette, smaller targets), so
that a teacher pre-trained there sees a different distribution from the students' data.

Every image is a pure function of (seed, split, index, SynthConfig), so the shards are byte-identical
for the same arguments on any machine.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attncache.pipeline._util import atomic
from attncache.pipeline.data.shards import brace_pattern, shard_writer

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
SPLITS = {"train": 0, "val": 1, "pool": 2, "shifted-train": 3, "shifted-val": 4, "shifted-pool": 5}
UNLABELLED = frozenset({"pool", "shifted-pool"})


@dataclass(frozen=True)
class SynthConfig:
    """The generator's knobs (documented in README, "The embedded data set")."""

    image_size: int = 32
    num_classes: int = 6
    decoys: int = 2  # up to this many flat shapes of other classes per image
    blobs: int = 3  # up to this many soft distractor ellipses
    scale: tuple[float, float] = (0.16, 0.30)  # target radius as a fraction of the image side
    texture: bool = True  # stripe texture inside the target (decoys are flat)
    noise: float = 12.0  # std of the background's pixel noise

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {self.num_classes}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0 < self.scale[0] <= self.scale[1] < 0.5:
            raise ValueError(f"scale must satisfy 0 < low <= high < 0.5, got {self.scale}")
        if self.decoys < 0 or self.blobs < 0:
            raise ValueError("decoys and blobs must be >= 0")


def _shifted(split: str) -> bool:
    return split.startswith("shifted")


def _background(rng: np.random.Generator, size: int, noise: float, shifted: bool) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0.0, 1.0, size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    if shifted:  # stripes instead of a smooth ramp: a different low-level distribution
        ramp = 0.5 + 0.5 * np.sign(np.sin(ramp * rng.uniform(3, 6) * np.pi * 2))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    img = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
    img += rng.normal(0, noise, (size, size, 3))
    return img


def _colour(rng: np.random.Generator, shifted: bool) -> tuple[int, int, int]:
    rgb = rng.uniform(0, 255, 3)
    if shifted:  # muted: pulled towards grey
        rgb = 0.4 * rgb + 0.6 * rgb.mean()
    return tuple(int(v) for v in rgb)


def _polygon(kind: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        angles = turn + np.array([0, 2, 4]) * np.pi / 3
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = turn + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx, cy, r, turn, fill, outline, width):
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.45)))
    elif kind == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif kind == "cross":
        t = r * 0.35
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif kind == "bar":
        draw.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, turn), fill=fill, outline=outline)


def _stripes(rng: np.random.Generator, size: int, a: tuple, b: tuple) -> Image.Image:
    """A two-colour stripe texture at a random angle and period (the target's marking)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(2.5, 4.5)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
    on = (np.floor(phase) % 2 == 0)[..., None]
    return Image.fromarray(np.where(on, np.array(a), np.array(b)).astype(np.uint8), "RGB")


def render_sample(seed: int, split: str, index: int, config: SynthConfig = SynthConfig()) -> tuple[bytes, int]:
    """PNG bytes and label of one image: a pure function of its arguments."""
    size, shifted = config.image_size, _shifted(split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))
    label = int(rng.integers(config.num_classes))
    canvas = Image.fromarray(np.clip(_background(rng, size, config.noise, shifted), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, config.blobs + 1))):
        r = rng.uniform(0.06, 0.18) * size
        cx, cy = rng.uniform(0, size, 2)
        draw.ellipse((cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r), fill=_colour(rng, shifted))
    others = [k for k in range(config.num_classes) if k != label]
    for _ in range(int(rng.integers(0, config.decoys + 1))):
        r = rng.uniform(0.10, 0.20) * size
        cx, cy = rng.uniform(r, size - r, 2)
        kind = SHAPES[others[int(rng.integers(len(others)))]]
        colour = _colour(rng, shifted)
        _draw_shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * np.pi), colour, colour, 1)
    low, high = config.scale
    if shifted:
        low, high = 0.75 * low, 0.75 * high
    r = rng.uniform(low, high) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = _colour(rng, shifted)
    outline = tuple(255 - v for v in fill)
    width = max(1, size // 32)
    turn = rng.uniform(0, 2 * np.pi)
    if config.texture:
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), SHAPES[label], cx, cy, r, turn, 255, 255, width)
        canvas.paste(_stripes(rng, size, fill, tuple(v // 2 for v in outline)), (0, 0), mask)
        _draw_shape(draw, SHAPES[label], cx, cy, r, turn, None, outline, width)
    else:
        _draw_shape(draw, SHAPES[label], cx, cy, r, turn, fill, outline, width)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), label


def write_split(out: Path, split: str, count: int, shard_size: int, seed: int, config: SynthConfig) -> list[Path]:
    """One split's shards `<split>-NNNNNN.tar`; unlabelled splits carry no `.cls` member."""
    paths = []
    for start in range(0, count, shard_size):
        path = out / f"{split}-{start // shard_size:06d}.tar"
        with shard_writer(path) as sink:
            for index in range(start, min(count, start + shard_size)):
                png, label = render_sample(seed, split, index, config)
                sample = {"__key__": f"{split.replace('-', '_')}_{index:08d}", "png": png}
                if split not in UNLABELLED:
                    sample["cls"] = str(label).encode()
                sink.write(sample)
        paths.append(path)
    return paths


def synth_dataset(out_dir: str | Path, num_train: int, num_val: int, shard_size: int = 256, seed: int = 0,
                  config: SynthConfig = SynthConfig(), num_pool: int = 0, num_shifted: int = 0) -> dict:
    """Write the splits plus classes.json and synth.json; returns each split's brace pattern and count.

    `num_pool` unlabelled images go to `pool`; `num_shifted` > 0 also writes `shifted-pool` (that
    many), `shifted-train` (num_train) and `shifted-val` (num_val).
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val, "pool": num_pool}
    if num_shifted:
        counts.update({"shifted-pool": num_shifted, "shifted-train": num_train, "shifted-val": num_val})
    info = {"classes": list(SHAPES[:config.num_classes]), "seed": seed, "config": asdict(config)}
    for split, count in counts.items():
        paths = write_split(out, split, count, shard_size, seed, config) if count else []
        info[split] = brace_pattern(paths) if paths else None
        info[f"num_{split}"] = count
    atomic.write_json(out / "classes.json", info["classes"])
    atomic.write_json(out / "synth.json", info)
    return info
