"""Webdataset tar shards: listing, counting, ordered reading, decoding with a bad-sample record.

Reading never raises for one bad sample: structural problems (truncated tar, duplicate key,
unsafe member path) come back as entries with an `error`, and `decode_sample` raises `BadSample`
with the file, key and reason, so the caller's single policy decides (skip and record, or fail).
Keys follow webdataset: a member path up to the first "." of its basename.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import braceexpand
import numpy as np
from PIL import Image
from tqdm.auto import tqdm
from webdataset.tariterators import base_plus_ext

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
LABEL_EXTENSIONS = ("cls", "label", "class")
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default bomb limit, applied here without touching PIL globals


_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^@\s'\"]*@")
_SECRET_QUERY = re.compile(r"(?i)(?P<name>[?&;][^=&\s'\"]*(?:sig|signature|token|secret|password|passwd|credential|"
                           r"key)[^=&\s'\"]*=)[^&\s'\"]*")


def redact(text: str, *urls: str) -> str:
    """A URL or message with object-store credentials blanked: `user:password@` in a URL and the
    values of query parameters that carry signatures, tokens, secrets or keys (presigned URLs);
    the userinfo of each of `urls` is blanked wherever it appears (a backend's error message may
    quote the path without its scheme).

    Every URL that reaches the store's metadata, a summary line, an error or a log goes through
    this, so a credential given in `--data` or `--out` is used to read and write but never shown."""
    text = str(text)
    for url in urls:
        found = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^@\s'\"/]*)@", str(url))
        if found and found.group(1):
            text = text.replace(found.group(1), "***")
    return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>***@", text))


class BadSample(Exception):
    """One sample cannot be used; carries where and why (the message has the URL redacted)."""

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"{redact(url)}: sample {key!r}: {reason}")
        self.url, self.key, self.reason = url, key, reason

    def __reduce__(self):  # survives pickling across loader workers and Ray
        return (BadSample, (self.url, self.key, self.reason))


class DataError(Exception):
    """A problem with the data as a whole: nothing matched, a shard that is not a tar."""


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns (or a list of them) to shard URLs, in the order given, without repeats."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if url not in urls:
                urls.append(url)
    if not urls:
        raise DataError(f"data pattern {redact(repr(spec))} matches no shards")
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"data pattern {redact(repr(spec))}: no such shard file(s): {redact(shown)}")
    return urls


def _open(url: str):
    if "://" in url:
        import fsspec
        return fsspec.open(url, "rb").open()
    return open(url, "rb")


@dataclass(frozen=True)
class ShardEntry:
    """One sample as stored in the tar, before decoding."""

    position: int
    key: str
    members: Mapping[str, bytes]
    error: str | None = None


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in Path(name).parts


def iter_shard(url: str) -> Iterator[ShardEntry]:
    """Samples in tar order; broken ones carry an error instead of raising."""
    try:
        fileobj = _open(url)
    except OSError as exc:
        raise DataError(redact(f"{url}: cannot open shard ({exc})", url)) from None
    with fileobj:
        try:
            stream = tarfile.open(fileobj=fileobj, mode="r|*")
        except tarfile.TarError as exc:
            raise DataError(redact(f"{url}: not a readable tar file ({exc})", url)) from None
        yield from _group(url, _members(url, stream))


def _members(url: str, stream: tarfile.TarFile) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(member name, bytes, error) of regular files; a truncation ends the stream with an error."""
    name = None
    try:
        for info in stream:
            name = info.name
            if not info.isreg() or name.startswith("__") or "/__" in name:
                continue
            data = stream.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError("unexpected end of data")
            yield name, data, None
            stream.members = []
            name = None
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield (name or "?"), None, f"tar truncated or corrupt after the previous sample ({exc})"


def _group(url: str, members) -> Iterator[ShardEntry]:
    seen: dict[str, int] = {}
    position = 0
    current: dict | None = None

    def emit(sample: dict) -> ShardEntry:
        nonlocal position
        key, error = sample["key"], sample["error"]
        if error is None and key in seen:
            error = f"duplicate key in shard (first at position {seen[key]})"
        seen.setdefault(key, position)
        entry = ShardEntry(position, key, dict(sample["members"]), error)
        position += 1
        return entry

    for name, data, error in members:
        key, ext = base_plus_ext(name)
        if data is None:  # truncation: report the sample it cut through
            if current is not None and (key is None or key == current["key"]):
                current["error"] = f"tar truncated: {error}"
                yield emit(current)
            else:
                if current is not None:
                    yield emit(current)
                yield emit({"key": key or f"<unknown after position {position}>", "members": {},
                            "error": f"tar truncated: {error}"})
            return
        if key is None:
            key, ext = name, ""
        if current is None or key != current["key"]:
            if current is not None:
                yield emit(current)
            current = {"key": key, "members": {}, "error": None}
        if _unsafe(name):
            current["error"] = f"unsafe member path {name!r}"
        ext = ext.lower()
        if ext in current["members"]:
            current["error"] = f"duplicate member {name!r}"
        current["members"][ext] = data
    if current is not None:
        yield emit(current)


# ---------------------------------------------------------------------------------------------- decoding


def _image_member(entry: ShardEntry) -> tuple[str, bytes] | None:
    for ext, data in entry.members.items():
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return ext, data
    return None


def _label(url: str, entry: ShardEntry) -> int:
    for ext in LABEL_EXTENSIONS:
        if ext in entry.members:
            raw = entry.members[ext].decode("utf-8", errors="replace").strip()
            try:
                return int(raw)
            except ValueError:
                raise BadSample(url, entry.key, f"label is not an integer: {raw[:40]!r}") from None
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
        raise BadSample(url, entry.key, f"undecodable .{ext} image ({type(exc).__name__}: {exc})") from None
    return to_rgb(image)


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
    if "://" in url:
        return None
    return os.path.getsize(url)


def build_manifest(urls: Sequence[str], progress: bool = False) -> DatasetManifest:
    """Count and list keys of every shard (a pass over the tars, no image decoding)."""
    shards, owner, duplicates = [], {}, []
    for index, url in enumerate(tqdm(urls, desc="scan shards", unit="shard", disable=not progress)):
        keys, errors = [], []
        for entry in iter_shard(url):
            keys.append(entry.key)
            if entry.error:
                errors.append(f"{entry.key}: {entry.error}")
            first = owner.setdefault(entry.key, index)
            if first != index and len(duplicates) < 100 and entry.key not in duplicates:
                duplicates.append(entry.key)
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        shards.append(ShardInfo(url, len(keys), digest, _size(url), tuple(errors)))
    return DatasetManifest(tuple(shards), tuple(duplicates))


# ---------------------------------------------------------------------------------------------- writing


def shard_writer(path: Path):
    """A webdataset TarWriter whose tar headers carry no time, user or group: same input, same bytes."""
    from webdataset import TarWriter

    return TarWriter(str(path), user="attncache", group="attncache", mode=0o0444, mtime=0.0)


def sanitise_key(text: str) -> str:
    """Keys end up in file names and must not contain dots (webdataset splits keys at the first)."""
    clean = "".join(c if c.isalnum() and c.isascii() or c in "_-" else "_" for c in text)
    return clean or "_"


def pack_image_folder(src_dir: str | Path, out_dir: str | Path, shard_size: int,
                      prefix: str = "shard") -> tuple[list[Path], list[str]]:
    """SRC/<class>/<image> to shards of `shard_size` samples; returns (shards, files not packed).

    Classes are sorted names (label = index), files sorted within a class; image bytes are kept
    as they are. Non-image files are not packed and are listed, never dropped silently.
    """
    src, out = Path(src_dir), Path(out_dir)
    if shard_size < 1:
        raise DataError("--shard-size must be at least 1")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    if not classes:
        raise DataError(f"{src}: no class subfolders (expected SRC/<class name>/<image file>)")
    samples, ignored, used = [], [], set()
    for label, name in enumerate(classes):
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
    if not samples:
        raise DataError(f"{src}: no image files under the class folders")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(samples), shard_size):
        path = out / f"{prefix}-{i // shard_size:06d}.tar"
        with shard_writer(path) as sink:
            for key, ext, file, label in samples[i:i + shard_size]:
                sink.write({"__key__": key, ext: file.read_bytes(), "cls": str(label).encode()})
        shards.append(path)
    (out / "classes.json").write_text(__import__("json").dumps(classes, indent=1))
    return shards, ignored


def brace_pattern(paths: Sequence[Path]) -> str:
    """`dir/prefix-{000000..000009}.tar` for consecutively numbered shards."""
    first, last = Path(paths[0]), Path(paths[-1])
    if len(paths) == 1:
        return str(first)
    stem = first.name.rsplit("-", 1)[0]
    lo, hi = first.stem.rsplit("-", 1)[1], last.stem.rsplit("-", 1)[1]
    return str(first.parent / f"{stem}-{{{lo}..{hi}}}.tar")
