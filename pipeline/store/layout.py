"""The store's layout as arithmetic: units, slots, array and file paths, chunking, codecs. No I/O.

One unit = (input shard, view). Every per-sample array has the slot as its first axis, with
`slot = shard_index * slots_per_shard + position`, and a Zarr shard of exactly `slots_per_shard`
slots, so a unit owns one Zarr shard file per array: concurrent writers never share a file.
Everything here is a pure function of the store's metadata (storage_schema/README.md is the
authority), so it is tested without a store on disk and a reader in another language can follow it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.data.shards import redact
from attncache.pipeline.encodings.spec import Encoding

BASE_ARRAYS = ("key", "label", "valid", "aug")  # every other per-sample array is a factor array
FILL_VALUES = {"key": "", "label": -1}  # what empty slots hold; everything else is 0
FACTOR_CHUNK_SLOTS = 16


@dataclass(frozen=True)
class Unit:
    view: int
    shard_index: int
    url: str

    @property
    def name(self) -> str:
        return f"view {self.view} shard {self.shard_index:06d} ({redact(Path(self.url).name)})"


@dataclass(frozen=True)
class UnitData:
    """One unit's arrays as numpy, slot axis first (slots_per_shard long)."""

    keys: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    aug: np.ndarray
    factors: dict[str, np.ndarray]


def slot_range(shard_index: int, slots_per_shard: int) -> tuple[int, int]:
    """The unit's slots [start, stop) on every array's first axis."""
    start = shard_index * slots_per_shard
    return start, start + slots_per_shard


def units(meta: dict) -> list[Unit]:
    """Every unit of the store, view-major."""
    shards = meta["dataset"]["shards"]
    return [Unit(v, i, s["url"]) for v in range(meta["views"]) for i, s in enumerate(shards)]


def array_path(view: int, spec: dict) -> str:
    """Store-relative path of one view's array (`spec`: an entry of the metadata's `arrays`)."""
    return f"views/{view}/{spec['path']}"


def unit_files(meta: dict, view: int, shard_index: int) -> list[str]:
    """Store-relative paths of the Zarr shard files that this unit owns, one per array in the
    metadata's order (zarr's default chunk key encoding: `c/<shard>/0/...`)."""
    files = []
    for spec in meta["arrays"].values():
        ndim = 1 + len(spec["trailing_shape"])
        files.append("/".join([array_path(view, spec), "c", str(shard_index)] + ["0"] * (ndim - 1)))
    return files


def marker_path(view: int, shard_index: int) -> str:
    return f"units/{view}/{shard_index:06d}.json"


def factor_chunk_slots(slots_per_shard: int) -> int:
    """Slots per inner chunk of a factor array: the largest divisor of `slots_per_shard` up to 16.

    A trainer reads whole units; zarr's per-chunk cost (about 0.3 ms on this machine) made reading
    256 one-slot chunks cost as much as a student step, while 16-slot chunks read 10x faster and
    one sample still costs only a 16-sample decode (`show`, `verify --recompute`)."""
    return max(d for d in range(1, min(FACTOR_CHUNK_SLOTS, slots_per_shard) + 1) if slots_per_shard % d == 0)


def inner_chunk_slots(name: str, slots_per_shard: int) -> int:
    """Base arrays are one chunk per shard; factor arrays are read a few samples at a time."""
    return factor_chunk_slots(slots_per_shard) if name not in BASE_ARRAYS else slots_per_shard


def base_arrays(num_params: int) -> dict[str, dict]:
    return {
        "key": {"path": "key", "trailing_shape": [], "dtype": "str", "meaning": "webdataset __key__ ('' if empty)"},
        "label": {"path": "label", "trailing_shape": [], "dtype": "int64", "meaning": "class label, -1 if empty"},
        "valid": {"path": "valid", "trailing_shape": [], "dtype": "uint8", "meaning": "1 if the slot holds a sample"},
        "aug": {"path": "aug", "trailing_shape": [max(num_params, 1)], "dtype": "float64",
                "meaning": "augmentation params (layout in recipe.layout; one unused 0 when the recipe draws none)"},
    }


def factor_arrays(encoding: Encoding, num_layers: int, num_heads: int, num_tokens: int, head_dim: int) -> dict[str, dict]:
    return {s.name: {"path": f"factors/{s.name}", "trailing_shape": list(s.trailing_shape), "dtype": s.dtype,
                     "meaning": s.meaning}
            for s in encoding.array_specs(num_layers, num_heads, num_tokens, head_dim)}


def compressors(compression: dict):
    """zarr codecs for the metadata's `compression` (None: stored raw)."""
    if compression["codec"] == "none":
        return None
    if compression["shuffle"] == "none":
        return ZstdCodec(level=compression["level"])
    shuffle = {"byte": "shuffle", "bit": "bitshuffle"}[compression["shuffle"]]
    return BloscCodec(cname="zstd", clevel=compression["level"], shuffle=shuffle,
                      blocksize=compression.get("blocksize", 0))


COMPRESSION_GRAMMAR = "zstd[:LEVEL][:shuffle|bitshuffle[:block=SIZE]]' or 'none"
# blosc's block: 0 (absent) lets blosc choose (tens of KB); a larger one lets zstd see whole byte
# planes of a shuffled chunk (BLOCK_RANGE in bytes; written 64K, 1M, or a byte count)
BLOCK_RANGE = (4 << 10, 256 << 20)


def parse_compression(spec: str) -> dict:
    """`zstd:3`, `zstd:5:shuffle`, `zstd:3:bitshuffle`, `zstd:1:shuffle:block=1M`, `none`."""
    parts = spec.strip().split(":")
    if parts == ["none"]:
        return {"codec": "none", "level": 0, "shuffle": "none"}
    if parts[0] != "zstd" or len(parts) > 4:
        raise SpecError(f"bad compression {spec!r}: expected '{COMPRESSION_GRAMMAR}'")
    try:
        if len(parts) > 1 and not (parts[1].isascii() and parts[1].isdigit()):
            raise ValueError(parts[1])  # int() would also take "+3", "1_0" and non-ASCII digits
        level = int(parts[1]) if len(parts) > 1 else 3
    except ValueError:
        raise SpecError(f"bad compression {spec!r}: level {parts[1]!r} is not an integer "
                        f"(expected '{COMPRESSION_GRAMMAR}', e.g. zstd:3)") from None
    shuffle = {"shuffle": "byte", "bitshuffle": "bit", "noshuffle": "none"}.get(parts[2] if len(parts) > 2 else "noshuffle")
    if shuffle is None and parts[2].startswith("block="):
        raise SpecError(f"bad compression {spec!r}: a block is blosc's, which only a shuffle uses: "
                        f"zstd:{parts[1]}:shuffle:{parts[2]}")
    if shuffle is None:
        raise SpecError(f"bad compression {spec!r}: shuffle must be 'shuffle' or 'bitshuffle'")
    top = 22 if shuffle == "none" else 9  # zstd's levels; blosc (used for shuffles) takes 0-9
    if not 0 <= level <= top:
        raise SpecError(f"bad compression {spec!r}: level {level} is not in 0..{top}"
                        + (" (a shuffle goes through blosc, whose levels stop at 9)" if top == 9 else ""))
    out = {"codec": "zstd", "level": level, "shuffle": shuffle}
    if len(parts) == 4:
        if shuffle == "none":
            raise SpecError(f"bad compression {spec!r}: a block is blosc's, which only a shuffle uses: "
                            f"zstd:{level}:shuffle:{parts[3]}")
        out["blocksize"] = _parse_block(spec, parts[3])
    return out


def _parse_block(spec: str, part: str) -> int:
    """`block=1M` / `block=256K` / `block=65536` in bytes, within BLOCK_RANGE."""
    text = part[len("block="):] if part.startswith("block=") else None
    unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1) if text else 1
    digits = text[:-1] if text and unit > 1 else text
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise SpecError(f"bad compression {spec!r}: {part!r} is not 'block=SIZE' (bytes, or with K or M, e.g. block=1M)")
    size = int(digits[-12:]) * unit if len(digits.lstrip("0")) <= 12 else BLOCK_RANGE[1] + 1  # no 4300-digit int()
    low, high = BLOCK_RANGE
    if not low <= size <= high:
        shown = f"{size} bytes" if size <= high else "above 256M"
        raise SpecError(f"bad compression {spec!r}: block {shown} is not in {low}..{high} (4K..256M)")
    return size


def compression_spec(compression: dict) -> str:
    """The spec `parse_compression` turns into `compression` (a store's metadata), e.g. `zstd:3:shuffle`."""
    if compression["codec"] == "none":
        return "none"
    spec = f"zstd:{compression['level']}" + {"none": "", "byte": ":shuffle", "bit": ":bitshuffle"}[compression["shuffle"]]
    block = compression.get("blocksize")
    if block is not None:
        spec += f":block={block >> 20}M" if block % (1 << 20) == 0 else f":block={block >> 10}K" if block % 1024 == 0 else f":block={block}"
    return spec


def all_fill(block: np.ndarray, fill) -> bool:
    """Whether a unit's block holds only fill values (zarr would then write no file at all).

    A factor block is tens of MB and almost never all fill: a strided sample of it answers first (a
    fifth of a second less per exact unit), the whole comparison only when the sample is all fill."""
    if block.dtype == object:
        return all(v == fill for v in block.ravel())
    flat = block.reshape(-1)
    return bool(np.all(flat[::4099] == fill)) and bool(np.all(flat == fill))
