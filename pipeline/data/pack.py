"""Writing shards: the deterministic tar writer and `data pack` of an ImageFolder.

Packing shuffles samples across shards by default (seeded, and the seed is recorded in
`PREFIX-pack.json` beside the shards): the trainer streams shards with a bounded shuffle buffer,
and class-ordered shards (the first shard holding the first classes) gave batches of a few classes
and a student at chance. Class indices come from one mapping per output folder, `classes.json`:
the first split packed there writes it (sorted class folder names), every later split (a val split
may lack classes) is labelled through it, and a class it does not hold is refused by name before
anything is written. Same arguments and same files give byte-identical output.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from attncache.pipeline.data.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def shard_writer(path: Path):
    """A webdataset TarWriter whose tar headers carry no time, user or group: same input, same bytes."""
    from webdataset import TarWriter

    return TarWriter(str(path), user="attncache", group="attncache", mode=0o0444, mtime=0.0)


def sanitise_key(text: str) -> str:
    """Keys end up in file names and must not contain dots (webdataset splits keys at the first)."""
    clean = "".join(c if c.isalnum() and c.isascii() or c in "_-" else "_" for c in text)
    return clean or "_"


def class_mapping(src: Path, out: Path) -> tuple[list[str], dict[str, int], bool]:
    """(the mapping's class list, label of each class folder in SRC, whether the mapping existed).

    An existing OUT/classes.json is the mapping (train and val share it); a SRC class it lacks is
    refused by name, since a label made up for it would be another class's index."""
    present = sorted(p.name for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    if not present:
        raise DataError(f"{src}: no class subfolders (expected SRC/<class name>/<image file>)")
    path = out / "classes.json"
    if not path.exists():
        return present, {name: i for i, name in enumerate(present)}, False
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable class list ({exc}); fix or delete it") from None
    if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise DataError(f"{path}: expected a JSON list of distinct class names; fix or delete it")
    unknown = [name for name in present if name not in classes]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(f"{src}: class folder {shown} not in the existing {path} ({len(classes)} classes); "
                        f"pack into a new OUT_DIR, or pack the split with every class first")
    return classes, {name: classes.index(name) for name in present}, True


def list_samples(src: Path, labels: dict[str, int]) -> tuple[list[tuple[str, str, Path, int]], list[str]]:
    """(key, extension, file, label) of every image in class-then-file order, and the files that
    are not images (listed, never dropped silently). Keys are sanitised file paths: no dots, no
    separators, so no key can name a path outside a folder."""
    samples, ignored, used = [], [], set()
    for name in sorted(labels):
        label = labels[name]
        for file in sorted(p for p in (src / name).rglob("*") if p.is_file()):
            ext = file.suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTENSIONS:
                ignored.append(str(file))
                continue
            key = base = sanitise_key(f"{label:04d}_{file.relative_to(src / name).with_suffix('')}")
            n = 1
            while key in used:
                key, n = f"{base}_{n}", n + 1
            used.add(key)
            samples.append((key, ext, file, label))
    return samples, ignored


def shuffled(samples: list, seed: int) -> list:
    """A permutation drawn from the seed alone (not from time or file-system order)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9ACC]))
    return [samples[i] for i in rng.permutation(len(samples))]


def pack_image_folder(src_dir: str | Path, out_dir: str | Path, shard_size: int, prefix: str = "shard",
                      seed: int = 0, shuffle: bool = True) -> tuple[list[Path], list[str]]:
    """SRC/<class>/<image> to shards of `shard_size` samples; returns (shards, files not packed).

    Labels are indices in OUT/classes.json (written from the sorted class names if absent);
    image bytes are kept as they are. Every check runs before the first byte is written, and
    each shard is written to a temporary name and renamed into place."""
    src, out = Path(src_dir), Path(out_dir)
    if shard_size < 1:
        raise DataError("--shard-size must be at least 1")
    if not _PREFIX.match(prefix):
        raise DataError(f"--prefix {prefix!r}: use letters, digits, '_', '-' or '.' (no path separators)")
    classes, labels, existed = class_mapping(src, out)
    samples, ignored = list_samples(src, labels)
    if not samples:
        raise DataError(f"{src}: no image files under the class folders")
    if shuffle:
        samples = shuffled(samples, seed)
    out.mkdir(parents=True, exist_ok=True)
    shards, records = [], []
    for i in range(0, len(samples), shard_size):
        path = out / f"{prefix}-{i // shard_size:06d}.tar"
        chunk = samples[i:i + shard_size]
        _write_shard(path, chunk)
        shards.append(path)
        records.append({"name": path.name, "count": len(chunk),
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    if not existed:
        _write_atomic(out / "classes.json", json.dumps(classes, indent=1))
    per_class = {c: sum(1 for s in samples if s[3] == labels[c]) for c in sorted(labels)}
    manifest = {"src": str(src_dir), "prefix": prefix, "shard_size": shard_size, "shuffle": shuffle, "seed": seed,
                "classes": "classes.json", "num_classes": len(classes), "samples": len(samples),
                "samples_per_class": per_class, "shards": records, "not_packed": ignored}
    _write_atomic(out / f"{prefix}-pack.json", json.dumps(manifest, indent=1, sort_keys=True))
    return shards, ignored


def _write_shard(path: Path, samples: Sequence[tuple[str, str, Path, int]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        with shard_writer(tmp) as sink:
            for key, ext, file, label in samples:
                sink.write({"__key__": key, ext: file.read_bytes(), "cls": str(label).encode()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def brace_pattern(paths: Sequence[Path]) -> str:
    """`dir/prefix-{000000..000009}.tar` for consecutively numbered shards."""
    first, last = Path(paths[0]), Path(paths[-1])
    if len(paths) == 1:
        return str(first)
    stem = first.name.rsplit("-", 1)[0]
    lo, hi = first.stem.rsplit("-", 1)[1], last.stem.rsplit("-", 1)[1]
    return str(first.parent / f"{stem}-{{{lo}..{hi}}}.tar")
