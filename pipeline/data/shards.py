"""Webdataset tar shards: listing, counting, ordered reading, decoding with a bad-sample record.

Reading never raises for one bad sample: structural problems (truncated tar, duplicate key,
unsafe member path, links, directories, oversized samples; see pipeline/data/tar.py) come back as
entries with an `error`, and `decode_sample` raises `BadSample` with the file, key and reason, so
the caller's single policy decides (skip and record, or fail). Keys follow webdataset: a member
path up to the first "." of its basename. What `--data` takes (brace patterns, lists, globs) lives
in patterns.py, reading in tar.py, writing and `data pack` in pack.py; every public name stays
importable from here.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from attncache.pipeline._util.files import is_local
from attncache.pipeline.data.errors import BadSample, DataError, redact  # noqa: F401  (public here)
from attncache.pipeline.data.pack import IMAGE_EXTENSIONS, brace_pattern, pack_image_folder, sanitise_key, shard_writer
from attncache.pipeline.data.patterns import expand_shards  # noqa: F401  (public here)
from attncache.pipeline.data.tar import (DEFAULT_MAX_SAMPLE_BYTES, MAX_SAMPLE_BYTES_RANGE, ShardEntry,
    check_max_sample_bytes, iter_shard, open_url)

LABEL_EXTENSIONS = ("cls", "label", "class")
MAX_LABEL = 2**31 - 1  # labels are class indices; anything above is a bad value, not a class
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default bomb limit, applied here without touching PIL globals


# ---------------------------------------------------------------------------------------------- decoding


def _image_member(entry: ShardEntry) -> tuple[str, bytes] | None:
    for ext, data in entry.members.items():
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return ext, data
    return None


def parse_label(text: str) -> int | str:
    """The class index a label member holds, or why it holds none: ASCII digits only (int() would
    also take '1_0', '+3' and other scripts' digits), from 0 to MAX_LABEL (10**30 used to reach
    numpy's int64 and crash the unit with OverflowError; -1 is the empty slots' fill value)."""
    raw = text.strip().lstrip("\ufeff").strip()
    shown = raw[:40] + ("..." if len(raw) > 40 else "")
    if re.fullmatch(r"[0-9]+", raw):
        if len(raw) <= 10 and int(raw) <= MAX_LABEL:
            return int(raw)
        return f"label out of range: {shown} (labels are class indices 0 to {MAX_LABEL})"
    if re.fullmatch(r"-[0-9]+", raw):
        return f"label is negative: {shown} (labels are class indices 0 to {MAX_LABEL})"
    return f"label is not an integer: {shown!r}"


def _label(url: str, entry: ShardEntry) -> int:
    for ext in LABEL_EXTENSIONS:
        if ext in entry.members:
            label = parse_label(entry.members[ext].decode("utf-8", errors="replace"))
            if isinstance(label, str):
                raise BadSample(url, entry.key, label)
            return label
    raise BadSample(url, entry.key, "no label (expected a .cls, .label or .class member)")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit and 32-bit integer images are scaled, alpha is dropped (the
    colour channels are kept as stored, not composited), CMYK and palettes are converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255)
                               .astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image.convert("RGBA").convert("RGB") if image.mode != "LA" else image.convert("L").convert("RGB")
    return image.convert("RGB")


def decode_sample(url: str, entry: ShardEntry) -> tuple[Image.Image, int]:
    """An RGB image and its integer label, or BadSample saying why not."""
    image = decode_image(url, entry)
    return image, _label(url, entry)


def decode_image(url: str, entry: ShardEntry) -> Image.Image:
    """An RGB image, or BadSample saying why not; unlabelled shards (a pretraining pool) read through this."""
    if entry.error:
        raise BadSample(url, entry.key, entry.error)
    found = _image_member(entry)
    if found is None:
        raise BadSample(url, entry.key, f"no image member (have: {sorted(entry.members) or 'nothing'})")
    ext, data = found
    if not data:
        raise BadSample(url, entry.key, f"zero-byte image member .{ext}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BadSample(url, entry.key, f"image of {image.width}x{image.height} px exceeds the "
                                                f"decompression-bomb limit of {MAX_IMAGE_PIXELS} px")
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(url, entry.key, f"decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types for undecodable bytes
        raise BadSample(url, entry.key, f"undecodable .{ext} image ({type(exc).__name__}: {_no_address(exc)})") from None
    return to_rgb(image)


def _no_address(exc: Exception) -> str:
    """The error's message without object addresses (PIL names `<_io.BytesIO object at 0x7f...>`):
    the reason goes into the unit's marker, whose bytes must not depend on where memory was."""
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", str(exc))


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int
    keys_sha256: str
    size_bytes: int | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetManifest:
    shards: tuple[ShardInfo, ...]
    duplicate_keys_across_shards: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for s in self.shards:
            digest.update(f"{os.path.basename(s.url)}\t{s.count}\t{s.keys_sha256}\n".encode())
        return digest.hexdigest()

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def max_count(self) -> int:
        return max((s.count for s in self.shards), default=0)

    def to_json(self) -> dict:
        """What the store's metadata records: URLs with credentials redacted (`redact`)."""
        return {"shards": [{"url": redact(s.url), "count": s.count, "keys_sha256": s.keys_sha256,
                            "size_bytes": s.size_bytes, "errors": list(s.errors)} for s in self.shards],
                "duplicate_keys_across_shards": list(self.duplicate_keys_across_shards)}

    @classmethod
    def from_json(cls, d: dict) -> "DatasetManifest":
        shards = tuple(ShardInfo(s["url"], s["count"], s["keys_sha256"], s.get("size_bytes"),
                                 tuple(s.get("errors", ()))) for s in d["shards"])
        return cls(shards, tuple(d.get("duplicate_keys_across_shards", ())))


def _size(url: str) -> int | None:
    if not is_local(url):
        return None
    return os.path.getsize(url)


def build_manifest(urls: Sequence[str], progress: bool = False,
                   max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> DatasetManifest:
    """Count and list keys of every shard (a pass over the tars, no image decoding); counts do
    not depend on `max_sample_bytes`, only which entries carry an error."""
    shards, owner, duplicates = [], {}, []
    for index, url in enumerate(tqdm(urls, desc="scan shards", unit="shard", disable=not progress)):
        keys, errors = [], []
        for entry in iter_shard(url, max_sample_bytes):
            keys.append(entry.key)
            if entry.error:
                errors.append(f"{entry.key}: {entry.error}")
            first = owner.setdefault(entry.key, index)
            if first != index and len(duplicates) < 100 and entry.key not in duplicates:
                duplicates.append(entry.key)
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        shards.append(ShardInfo(url, len(keys), digest, _size(url), tuple(errors)))
    return DatasetManifest(tuple(shards), tuple(duplicates))
