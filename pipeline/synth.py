"""The embedded default data set: labelled shapes among distractors, written as webdataset shards.

What matters in these images is where to look: the class is the shape of the one outlined,
textured object; its position, scale and colour are random, the background is a noisy gradient,
and soft blobs distract. Every image is a pure function of (seed, split, index), so the shards are
byte-identical for the same arguments on any machine.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data import brace_pattern, shard_writer

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
SPLITS = {"train": 0, "val": 1}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0.0, 1.0, size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    img = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
    img += rng.normal(0, 12, (size, size, 3))
    return img


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


def render_sample(seed: int, split: str, index: int, image_size: int, num_classes: int) -> tuple[bytes, int]:
    """PNG bytes and label of one image: a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))
    label = int(rng.integers(num_classes))
    canvas = Image.fromarray(np.clip(_background(rng, image_size), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):  # distractor blobs
        r = rng.uniform(0.06, 0.18) * image_size
        cx, cy = rng.uniform(0, image_size, 2)
        draw.ellipse((cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r), fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    r = rng.uniform(0.18, 0.34) * image_size
    cx, cy = rng.uniform(r, image_size - r, 2)
    fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
    outline = tuple(255 - v for v in fill)
    _draw_shape(draw, SHAPES[label], cx, cy, r, rng.uniform(0, 2 * np.pi), fill, outline, max(1, image_size // 32))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), label


def synth_dataset(out_dir: str | Path, num_train: int, num_val: int, image_size: int = 32, shard_size: int = 256,
                  seed: int = 0, num_classes: int = 4) -> dict:
    """Write train-*.tar and val-*.tar plus classes.json; returns the brace patterns and counts."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES)}]")
    if image_size < 8 or shard_size < 1:
        raise ValueError("image_size must be >= 8 and shard_size >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"classes": list(SHAPES[:num_classes]), "image_size": image_size, "seed": seed}
    for split, count in (("train", num_train), ("val", num_val)):
        paths = []
        for start in range(0, count, shard_size):
            path = out / f"{split}-{start // shard_size:06d}.tar"
            with shard_writer(path) as sink:
                for index in range(start, min(count, start + shard_size)):
                    png, label = render_sample(seed, split, index, image_size, num_classes)
                    sink.write({"__key__": f"{split}_{index:08d}", "png": png, "cls": str(label).encode()})
            paths.append(path)
        info[split] = brace_pattern(paths) if paths else None
        info[f"num_{split}"] = count
    (out / "classes.json").write_text(json.dumps(info["classes"], indent=1))
    return info
