"""The Zarr v3 cache store: create or reopen, write one unit, read units, markers.

One unit = (input shard, view). Every per-sample array has the slot as its first axis, with
`slot = shard_index * slots_per_shard + position`, and a Zarr shard of exactly `slots_per_shard`
slots, so a unit owns one Zarr shard file per array: concurrent writers never share a file, and a
unit is written whole in one call per array (zarr 3.1 rewrites a whole shard on a partial write).
The unit's marker (JSON with counts, skipped keys and sha256 of each shard file) is written last
and atomically; readers and `verify` trust markers only. Layout and arithmetic: storage_schema/README.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from attncache.pipeline._util.fault import fault_point
from attncache.pipeline._util.spec_error import SpecError
from attncache.pipeline.data.shards import redact
from attncache.pipeline.encodings.spec import Encoding, encoding_from_json
from attncache.pipeline.store.guard import open_existing_or_none
from attncache.pipeline.store.integrity import array_doc_paths, content_problems, coverage_problems, metadata_sha256
from attncache.pipeline.store.meta import META_ATTR, StoreError, cache_id
from attncache.storage_schema import SCHEMA_VERSION, SchemaError, validate_marker, validate_store_metadata

BASE_ARRAYS = ("key", "label", "valid", "aug")  # every other per-sample array is a factor array
FILL_VALUES = {"key": "", "label": -1}  # what empty slots hold; everything else is 0


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


def _compressors(compression: dict):
    if compression["codec"] == "none":
        return None
    if compression["shuffle"] == "none":
        return ZstdCodec(level=compression["level"])
    shuffle = {"byte": "shuffle", "bit": "bitshuffle"}[compression["shuffle"]]
    return BloscCodec(cname="zstd", clevel=compression["level"], shuffle=shuffle)


def parse_compression(spec: str) -> dict:
    """`zstd:3`, `zstd:5:shuffle`, `zstd:3:bitshuffle`, `none`."""
    parts = spec.strip().split(":")
    if parts == ["none"]:
        return {"codec": "none", "level": 0, "shuffle": "none"}
    if parts[0] != "zstd" or len(parts) > 3:
        raise SpecError(f"bad compression {spec!r}: expected 'zstd[:LEVEL][:shuffle|bitshuffle]' or 'none'")
    try:
        level = int(parts[1]) if len(parts) > 1 else 3
    except ValueError:
        raise SpecError(f"bad compression {spec!r}: level {parts[1]!r} is not an integer "
                        "(expected 'zstd[:LEVEL][:shuffle|bitshuffle]', e.g. zstd:3)") from None
    shuffle = {"shuffle": "byte", "bitshuffle": "bit", "noshuffle": "none"}.get(parts[2] if len(parts) > 2 else "noshuffle")
    if shuffle is None:
        raise SpecError(f"bad compression {spec!r}: shuffle must be 'shuffle' or 'bitshuffle'")
    top = 22 if shuffle == "none" else 9  # zstd's levels; blosc (used for shuffles) takes 0-9
    if not 0 <= level <= top:
        raise SpecError(f"bad compression {spec!r}: level {level} is not in 0..{top}"
                        + (" (a shuffle goes through blosc, whose levels stop at 9)" if top == 9 else ""))
    return {"codec": "zstd", "level": level, "shuffle": shuffle}


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


class _Files:
    """Plain files beside the Zarr arrays (markers) and raw reads of shard files for checksums."""

    def __init__(self, root: str):
        self.root = root
        self.local = "://" not in root
        if not self.local:
            import fsspec
            self.fs, self.base = fsspec.core.url_to_fs(root)

    def _full(self, rel: str) -> str:
        return os.path.join(self.root, rel) if self.local else f"{self.base.rstrip('/')}/{rel}"

    def read(self, rel: str) -> bytes | None:
        try:
            if self.local:
                return Path(self._full(rel)).read_bytes()
            return self.fs.cat_file(self._full(rel))
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self._full(rel)
        if not self.local:  # object stores publish a put whole or not at all
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("marker-tmp")
        os.replace(tmp, path)

    def delete(self, rel: str) -> None:
        try:
            os.remove(self._full(rel)) if self.local else self.fs.rm_file(self._full(rel))
        except FileNotFoundError:
            pass

    def remove_partials(self, rel: str, pattern: str = ".*.partial") -> None:
        """zarr's LocalStore writes `<file>.<uuid>.partial` and renames it (and markers go through
        `<marker>.tmp-<pid>`); a writer killed in between leaves the temp file behind. Only this
        unit writes beside its own files."""
        if self.local:
            for stale in Path(self._full(rel)).parent.glob(Path(rel).name + pattern):
                stale.unlink(missing_ok=True)

    def size(self, rel: str) -> int | None:
        try:
            return os.path.getsize(self._full(rel)) if self.local else int(self.fs.size(self._full(rel)))
        except FileNotFoundError:
            return None

    def total_bytes(self) -> int:
        if self.local:
            return sum(p.stat().st_size for p in Path(self.root).rglob("*") if p.is_file())
        return int(self.fs.du(self.base))


class CacheStore:
    def __init__(self, path: str, group: zarr.Group, meta: dict):
        self.path = str(path)
        self.group = group
        self.meta = meta
        self.files = _Files(self.path)
        self.encoding: Encoding = encoding_from_json(meta["encoding"])
        self.slots_per_shard = int(meta["dataset"]["slots_per_shard"])
        self.num_shards = len(meta["dataset"]["shards"])
        self._digests: dict[int, str] = {}

    # ------------------------------------------------------------------ open / create

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "CacheStore":
        path = str(path)
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(redact(f"{path}: no attncache store here ({exc})", path)) from None
        meta = group.attrs.get(META_ATTR)
        if meta is None:
            raise SchemaError(f"{redact(path)}: zarr.json: attncache metadata missing (lost or overwritten); "
                              "restore it from a backup, or re-run the same `attncache precompute` command with "
                              "--repair, which restores it when the units' markers show that job wrote them")
        validate_store_metadata(meta, where=redact(path))
        if meta["cache_id"] != cache_id(meta):
            raise SchemaError(f"{redact(path)}: metadata edited after creation: cache_id {meta['cache_id'][:12]} does not "
                              f"match its contents ({cache_id(meta)[:12]})")
        return cls(path, group, meta)

    @classmethod
    def create_or_open(cls, path: str | Path, meta: dict, repair: bool = False) -> "CacheStore":
        """A new store, or the existing one when it was made by the same job (resume). Data of a store
        whose metadata cannot be trusted is never touched (pipeline/store/guard.py decides)."""

        path = str(path)
        meta = dict(meta, schema_version=SCHEMA_VERSION)
        meta["cache_id"] = cache_id(meta)
        validate_store_metadata(meta, where=redact(path))
        store = open_existing_or_none(cls, path, meta, repair)
        if store is not None:
            return store
        group = zarr.open_group(path, mode="a", zarr_format=3)  # "a": the lease file may be here
        store = cls(path, group, meta)
        store._create_arrays()
        fault_point("store-create")
        group.attrs[META_ATTR] = meta  # last: a store without metadata is not a store
        return store

    def _create_arrays(self) -> None:
        n_slots = self.meta["dataset"]["num_slots"]
        compressors = _compressors(self.meta["compression"])
        for view in range(self.meta["views"]):
            for name, spec in self.meta["arrays"].items():
                trailing = tuple(spec["trailing_shape"])
                inner = factor_chunk_slots(self.slots_per_shard) if name not in BASE_ARRAYS else self.slots_per_shard
                dtype = str if spec["dtype"] == "str" else spec["dtype"]
                self.group.create_array(
                    f"views/{view}/{spec['path']}", shape=(n_slots, *trailing), dtype=dtype,
                    chunks=(inner, *trailing), shards=(self.slots_per_shard, *trailing),
                    compressors=compressors if dtype is not str else ZstdCodec(level=3),
                    fill_value=FILL_VALUES.get(name, 0), overwrite=True)

    # ------------------------------------------------------------------ layout helpers

    def slot_range(self, shard_index: int) -> tuple[int, int]:
        start = shard_index * self.slots_per_shard
        return start, start + self.slots_per_shard

    def units(self) -> list[Unit]:
        shards = self.meta["dataset"]["shards"]
        return [Unit(v, i, s["url"]) for v in range(self.meta["views"]) for i, s in enumerate(shards)]

    def unit_files(self, view: int, shard_index: int) -> list[str]:
        """Store-relative paths of the Zarr shard files that this unit owns (default chunk key encoding)."""
        files = []
        for spec in self.meta["arrays"].values():
            ndim = 1 + len(spec["trailing_shape"])
            files.append("/".join([f"views/{view}/{spec['path']}", "c", str(shard_index)] + ["0"] * (ndim - 1)))
        return files

    @staticmethod
    def marker_path(view: int, shard_index: int) -> str:
        return f"units/{view}/{shard_index:06d}.json"

    # ------------------------------------------------------------------ markers

    def read_marker(self, view: int, shard_index: int) -> dict | None:
        """The unit's marker if present; a marker that fails its schema or names another job raises."""
        raw = self.files.read(self.marker_path(view, shard_index))
        if raw is None:
            return None
        where = f"{redact(self.path)}/{self.marker_path(view, shard_index)}"
        try:
            marker = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"{where}: marker is not JSON ({exc})") from exc
        validate_marker(marker, where=where)
        if marker["cache_id"] != self.meta["cache_id"]:
            raise SchemaError(f"{where}: marker belongs to another cache ({marker['cache_id'][:12]})")
        return marker

    def metadata_sha256(self, view: int) -> str:
        """Digest of the metadata a reader of `view` decodes with (pipeline/store/integrity.py); once per view."""
        cached = self._digests.get(view)
        if cached is None:
            docs = {rel: self.files.read(rel) for rel in array_doc_paths(self.meta, view)}
            cached = self._digests[view] = metadata_sha256(self.meta, docs)
        return cached

    def unit_problems(self, view: int, shard_index: int, full: bool = False) -> list[str]:
        """Why the unit is not done (empty: done). Cheap: marker, coverage, files present with their
        recorded sizes. Full: every file's sha256 as well."""
        try:
            marker = self.read_marker(view, shard_index)
        except SchemaError as exc:
            return [f"bad marker: {exc}"]
        if marker is None:
            return ["missing (no marker: never written, interrupted, or marker deleted)"]
        return self.file_problems(view, shard_index, marker, full)

    def unit_done(self, unit: Unit, full: bool = False) -> bool:
        return not self.unit_problems(unit.view, unit.shard_index, full)

    def file_sha256(self, rel: str) -> str | None:
        data = self.files.read(rel)
        return None if data is None else hashlib.sha256(data).hexdigest()

    def file_problems(self, view: int, shard_index: int, marker: dict, full: bool = True) -> list[str]:
        """Where the unit's marker fails to cover the store's metadata and files, or its Zarr shard
        files differ from what it recorded (empty: intact)."""
        problems = coverage_problems(marker, self.unit_files(view, shard_index), self.metadata_sha256(view))
        return problems + content_problems(marker, self.files.size, self.file_sha256, full)

    # ------------------------------------------------------------------ write / read

    def write_unit(self, unit: Unit, *, count: int, keys: list[str], labels: np.ndarray, valid: np.ndarray,
                   aug: np.ndarray, factors: dict[str, np.ndarray], skipped: list[dict],
                   fidelity_kl: list[float] | None = None, seconds: float = 0.0,
                   shard: tuple[str | None, str | None] = (None, None)) -> dict:
        """Write every array's shard whole, then the marker. Re-running a unit overwrites it in place.
        Every array gets a file, even one of fill values only, so the marker lists a digest for each.
        `shard`: sha256 of the input tar and of its members' names and sizes (pipeline/data/binding.py)."""
        marker_rel = self.marker_path(unit.view, unit.shard_index)
        self.files.delete(marker_rel)  # not done until rewritten
        self.files.remove_partials(marker_rel, ".tmp-*")  # a marker temp file of a killed writer
        fault_point("unit-start")
        start, stop = self.slot_range(unit.shard_index)
        blocks = {"key": np.array(keys, dtype=object), "label": labels, "valid": valid, "aug": aug, **factors}
        rels = self.unit_files(unit.view, unit.shard_index)
        for rel in rels:  # zarr merges into an existing shard file, and a torn one would fail its crc32c
            self.files.delete(rel)
        for (name, spec), rel in zip(self.meta["arrays"].items(), rels):
            block = blocks[name]
            expected = (self.slots_per_shard, *spec["trailing_shape"])
            if block.shape != expected:
                raise StoreError(f"{unit.name}: array {name} has shape {block.shape}, store expects {expected}")
            array = self.group[f"views/{unit.view}/{spec['path']}"]
            if _all_fill(block, FILL_VALUES.get(name, 0)):  # zarr would write no file at all
                array = array.with_config({"write_empty_chunks": True})
            array[start:stop] = block
            fault_point("array-written", self.files._full(rel) if self.files.local else None)
        for rel in rels:
            self.files.remove_partials(rel)  # left by a writer of this unit that was killed
        fault_point("data-written")
        files = {rel: self.file_sha256(rel) for rel in rels}
        if any(digest is None for digest in files.values()):
            raise StoreError(f"{unit.name}: Zarr shard files {[r for r, d in files.items() if d is None]} were not "
                             "written")
        marker = {"schema_version": SCHEMA_VERSION, "cache_id": self.meta["cache_id"], "view": unit.view,
                  "shard_index": unit.shard_index, "shard_url": redact(unit.url), "shard_sha256": shard[0],
                  "shard_members_sha256": shard[1],
                  "slot_start": start, "count": count, "written": int(valid.sum()), "skipped": skipped,
                  "files": files, "sizes": {rel: self.files.size(rel) for rel in rels},
                  "metadata_sha256": self.metadata_sha256(unit.view),
                  "fidelity_kl": fidelity_kl, "seconds": round(float(seconds), 3)}
        validate_marker(marker)
        self.files.write_atomic(marker_rel, json.dumps(marker, indent=1, sort_keys=True).encode())
        fault_point("unit-done")
        return marker

    def read_unit(self, view: int, shard_index: int) -> UnitData:
        start, stop = self.slot_range(shard_index)
        arrays = {name: self.group[f"views/{view}/{spec['path']}"][start:stop]
                  for name, spec in self.meta["arrays"].items()}
        factors = {n: a for n, a in arrays.items() if n not in BASE_ARRAYS}
        return UnitData(arrays["key"], arrays["label"], arrays["valid"], arrays["aug"], factors)

    def read_factors(self, view: int, slots: list[int]) -> dict[str, np.ndarray]:
        """Factor arrays for chosen slots, stacked [len(slots), ...] (one inner chunk read per slot)."""
        names = [n for n in self.meta["arrays"] if n not in BASE_ARRAYS]
        out = {}
        for name in names:
            arr = self.group[f"views/{view}/{self.meta['arrays'][name]['path']}"]
            out[name] = np.stack([arr[s] for s in slots])
        return out

    def bytes_on_disk(self) -> int:
        return self.files.total_bytes()

    def unit_factor_bytes(self, unit: Unit) -> int:
        """Bytes of one unit's factor shard files: what the encoding costs on disk."""
        return sum(self.files.size(rel) or 0 for rel in self.unit_files(unit.view, unit.shard_index)
                   if "/factors/" in rel)


FACTOR_CHUNK_SLOTS = 16


def factor_chunk_slots(slots_per_shard: int) -> int:
    """Slots per inner chunk of a factor array: the largest divisor of `slots_per_shard` up to 16.

    A trainer reads whole units; zarr's per-chunk cost (about 0.3 ms on this machine) made reading
    256 one-slot chunks cost as much as a student step, while 16-slot chunks read 10x faster and
    one sample still costs only a 16-sample decode (`show`, `verify --recompute`)."""
    return max(d for d in range(1, min(FACTOR_CHUNK_SLOTS, slots_per_shard) + 1) if slots_per_shard % d == 0)


def _all_fill(block: np.ndarray, fill) -> bool:
    return bool(np.all(block == fill)) if block.dtype != object else all(v == fill for v in block.ravel())
