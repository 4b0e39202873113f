"""The Zarr v3 cache store's I/O: create or reopen, write one unit, read units and markers.

What lies where is arithmetic (store/layout.py); a marker's bytes and checksums are store/markers.py;
when a marker covers its unit is store/integrity.py; files beside the arrays go through the one file
layer (pipeline/_util/files.py), so a local folder and an fsspec URL take the same code. A unit is
written whole, one shard file per array, each encoded in memory by zarr (store/shard_bytes.py) and
hashed in hand for the marker, then written by the file layer; its marker last and atomically;
readers and `verify` trust markers only.

`write_unit` runs in named stages (`_unmark`, `_write_data` with one `_write_array` per array, then
the marker): the crash tests kill the process between them (tests/reliability/faults.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from attncache.pipeline._util.atomic import TEMP_MARK
from attncache.pipeline._util.files import Files
from attncache.pipeline.data.shards import redact
from attncache.pipeline.encodings.spec import Encoding, encoding_from_json
from attncache.pipeline.store import layout
from attncache.pipeline.store.guard import open_existing_or_none
from attncache.pipeline.store.integrity import (REPAIR_ADVICE, array_doc_paths, content_problems, coverage_problems,
    grown_digests, metadata_sha256)
from attncache.pipeline.store.layout import BASE_ARRAYS, FILL_VALUES, Unit, UnitData
from attncache.pipeline.store.markers import encode_marker, new_marker, parse_marker, sha256_hex, sha256_parts
from attncache.pipeline.store.meta import META_ATTR, StoreError, cache_id
from attncache.pipeline.store.reshape import doc_slots, doc_with_slots, docs_at_slots, read_journal, resized_arrays
from attncache.pipeline.store.shard_bytes import encode_shard_parts, parts_size
from attncache.pipeline.store.unit_read import UnitBytes, decode_unit, fetch_unit
from attncache.storage_schema import SCHEMA_VERSION, SchemaError, validate_store_metadata

class CacheStore:
    def __init__(self, path: str, group: zarr.Group, meta: dict):
        self.path = str(path)
        self.group = group
        self.meta = meta
        self.files = Files(self.path)
        self.encoding: Encoding = encoding_from_json(meta["encoding"])
        self.slots_per_shard = int(meta["dataset"]["slots_per_shard"])
        self.num_shards = len(meta["dataset"]["shards"])
        self._digests: dict[int, str] = {}
        self._docs: dict[int, dict[str, bytes | None]] = {}
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self._grown: dict[int, list[str]] = {}
        self.views_on_disk = int(meta["views"])  # what the root metadata says; fewer while a grow runs
        self.shards_on_disk = self.num_shards
        self.pending_docs: dict[str, bytes] = {}  # resized arrays' zarr.json, written when a shard grow ends

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
        group.attrs[META_ATTR] = meta  # last: a store without metadata is not a store
        return store

    def _create_arrays(self) -> None:
        self.create_view_arrays(range(self.meta["views"]))

    def create_view_arrays(self, views, only_missing: bool = False) -> None:
        """Every array of `views`; `only_missing`: leave an array whose zarr.json exists with this
        store's slot count (a resumed grow), never one of another size (an abandoned grow's)."""
        n_slots = self.meta["dataset"]["num_slots"]
        compressors = layout.compressors(self.meta["compression"])
        for view in views:
            for name, spec in self.meta["arrays"].items():
                doc = self.files.read(f"{layout.array_path(view, spec)}/zarr.json") if only_missing else None
                if doc is not None and doc_slots(doc) == n_slots:
                    continue
                trailing = tuple(spec["trailing_shape"])
                inner = layout.inner_chunk_slots(name, self.slots_per_shard)
                dtype = str if spec["dtype"] == "str" else spec["dtype"]
                self.group.create_array(
                    layout.array_path(view, spec), shape=(n_slots, *trailing), dtype=dtype,
                    chunks=(inner, *trailing), shards=(self.slots_per_shard, *trailing),
                    compressors=compressors if dtype is not str else ZstdCodec(level=3),
                    fill_value=FILL_VALUES.get(name, 0), overwrite=True)

    # ------------------------------------------------------------------ growing (store/grow.py)

    @property
    def growing(self) -> bool:
        """Whether the metadata in memory holds more views or shards than the root metadata on disk."""
        return self.views_on_disk < self.meta["views"] or self.shards_on_disk < self.num_shards

    def start_growing(self, meta: dict) -> None:
        """Work under the grown metadata, in memory only until `settled_on_disk`."""
        self.meta, self.num_shards = meta, len(meta["dataset"]["shards"])
        self._digests.clear()
        self._docs.clear()
        self._grown.clear()

    def resize_arrays_in_memory(self) -> None:
        """Every array of the views on disk at the grown slot count, its zarr.json kept as it is until
        the grow ends (`pending_docs`): new units are written while readers see the old store."""
        n_slots = self.meta["dataset"]["num_slots"]
        keys = [(v, name) for v in range(self.views_on_disk) for name in self.meta["arrays"]]
        self._arrays.update(resized_arrays({k: self._array(*k) for k in keys}, n_slots))
        for view, name in keys:
            rel = f"{layout.array_path(view, self.meta['arrays'][name])}/zarr.json"
            self.pending_docs[rel] = doc_with_slots(self.files.read(rel), n_slots)
        self._digests.clear()
        self._docs.clear()
        self._grown.clear()

    def settled_on_disk(self) -> None:
        """The grown metadata and arrays are on disk now."""
        self.views_on_disk, self.shards_on_disk = self.meta["views"], self.num_shards
        self.pending_docs = {}
        self._docs.clear()

    # ------------------------------------------------------------------ layout (store/layout.py)

    def slot_range(self, shard_index: int) -> tuple[int, int]:
        return layout.slot_range(shard_index, self.slots_per_shard)

    def units(self) -> list[Unit]:
        return layout.units(self.meta)

    def unit_files(self, view: int, shard_index: int) -> list[str]:
        """Store-relative paths of the Zarr shard files that this unit owns."""
        return layout.unit_files(self.meta, view, shard_index)

    marker_path = staticmethod(layout.marker_path)

    def _array(self, view: int, name: str) -> zarr.Array:
        """The opened array, kept for the store's lifetime: opening reads its `zarr.json` (two
        requests on an object store), which would otherwise be paid again for every unit."""
        array = self._arrays.get((view, name))
        if array is None:
            array = self._arrays[(view, name)] = self.group[layout.array_path(view, self.meta["arrays"][name])]
        return array

    # ------------------------------------------------------------------ markers

    def read_marker(self, view: int, shard_index: int) -> dict | None:
        """The unit's marker if present; a marker that fails its schema or names another job raises."""
        raw = self.files.read(self.marker_path(view, shard_index))
        if raw is None:
            return None
        return parse_marker(raw, f"{redact(self.path)}/{self.marker_path(view, shard_index)}", self.meta["cache_id"])

    def metadata_sha256(self, view: int) -> str:
        """Digest of the metadata a reader of `view` decodes with (pipeline/store/integrity.py); once per view."""
        cached = self._digests.get(view)
        if cached is None:
            cached = self._digests[view] = metadata_sha256(self.meta, self.array_docs(view))
        return cached

    def array_docs(self, view: int) -> dict[str, bytes | None]:
        """The view's arrays' zarr.json as a reader of this metadata digests them (store/reshape.py),
        read once per metadata: the bytes that `metadata_sha256` covers are the bytes
        `read_checked_unit` decodes with."""
        if view not in self._docs:
            docs = {rel: self.pending_docs.get(rel) or self.files.read(rel) for rel in array_doc_paths(self.meta, view)}
            self._docs[view] = docs_at_slots(docs, self.meta["dataset"]["num_slots"])
        return self._docs[view]

    def accepted_digests(self, view: int) -> list[str]:
        """The current digest, then those a grown store's older markers hold: under fewer views
        (store/integrity.py), and the old digest of a grow's journal written for exactly this metadata."""
        if view not in self._grown:
            digests = grown_digests(self.meta, view, self.array_docs(view))
            journal = read_journal(self.files) or {}
            if journal.get("new", {}).get(str(view)) == digests[0] and str(view) in journal.get("old", {}):
                digests.append(journal["old"][str(view)])
            self._grown[view] = digests
        return self._grown[view]

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
        return sha256_hex(self.files.read(rel))

    def file_problems(self, view: int, shard_index: int, marker: dict, full: bool = True,
                      fetched: UnitBytes | None = None) -> list[str]:
        """Where the unit's marker fails to cover the store's metadata and files, or its Zarr shard
        files differ from what it recorded (empty: intact). `fetched`: check those bytes of the
        unit's files (`fetch_unit`) instead of reading them (a file the layout does not give the
        unit, which only a bad marker lists, is still read)."""
        digests = self.metadata_sha256(view)
        if marker["metadata_sha256"] != digests:
            digests = self.accepted_digests(view)
        problems = coverage_problems(marker, self.unit_files(view, shard_index), digests)
        if fetched is None:
            return problems + content_problems(marker, self.files.size, self.file_sha256, full)

        def size_of(rel: str) -> int | None:
            return fetched.size(rel) if rel in fetched.files else self.files.size(rel)

        def sha256_of(rel: str) -> str | None:
            return fetched.sha256(rel) if rel in fetched.files else self.file_sha256(rel)

        return problems + content_problems(marker, size_of, sha256_of, full)

    # ------------------------------------------------------------------ write / read

    def write_unit(self, unit: Unit, *, count: int, keys: list[str], labels: np.ndarray, valid: np.ndarray,
                   aug: np.ndarray, factors: dict[str, np.ndarray], skipped: list[dict],
                   fidelity_kl: list[float] | None = None, seconds: float = 0.0,
                   shard: tuple[str | None, str | None] = (None, None)) -> dict:
        """Unmark the unit, write every array's shard whole, then the marker. Re-running a unit
        overwrites it in place. Every array gets a file, even one of fill values only, so the marker
        lists a digest for each. `shard`: sha256 of the input tar and of its members' names and sizes."""
        self._unmark(unit)
        blocks = {"key": np.array(keys, dtype=object), "label": labels, "valid": valid, "aug": aug, **factors}
        written = self._write_data(unit, blocks)
        marker = new_marker(self.meta["cache_id"], unit, slot_start=self.slot_range(unit.shard_index)[0], count=count,
                            valid=valid, skipped=skipped, files={rel: digest for rel, (digest, _) in written.items()},
                            sizes={rel: size for rel, (_, size) in written.items()},
                            metadata_sha256=self.metadata_sha256(unit.view), fidelity_kl=fidelity_kl,
                            seconds=seconds, shard=shard)
        self.files.write_atomic(self.marker_path(unit.view, unit.shard_index), encode_marker(marker))
        return marker

    def _unmark(self, unit: Unit) -> None:
        """The unit is not done until its marker is rewritten: delete it, and a marker temp file
        that a killed writer left between writing and renaming it."""
        rel = self.marker_path(unit.view, unit.shard_index)
        self.files.delete(rel)
        self.files.remove_temps(rel, ".tmp-*")

    def _write_data(self, unit: Unit, blocks: dict[str, np.ndarray]) -> dict[str, tuple[str, int]]:
        """Every array's shard file of the unit, whole; returns {store-relative path: (sha256, size)}
        of the bytes written. Each file replaces the old one whole (store/shard_bytes.py encodes it
        in memory), so nothing of an earlier write is merged in. A writer of this unit killed between
        writing a temp and renaming it leaves `<file>.tmp-*` (or, from zarr's own writes of older
        versions, `<file>.<uuid>.partial`): cleared last (only this unit writes here)."""
        rels = self.unit_files(unit.view, unit.shard_index)
        written = {rel: self._write_array(unit, name, rel, blocks[name]) for name, rel in zip(self.meta["arrays"], rels)}
        for rel in rels:
            self.files.remove_temps(rel, ".*.partial")
            self.files.remove_temps(rel, f"{TEMP_MARK}*")
        return written

    def _write_array(self, unit: Unit, name: str, rel: str, block: np.ndarray) -> tuple[str, int]:
        """One array's block of the unit: its shard file `rel`, whole; returns the sha256 and size
        of the bytes written, hashed in hand rather than read back."""
        spec = self.meta["arrays"][name]
        expected = (self.slots_per_shard, *spec["trailing_shape"])
        if block.shape != expected:
            raise StoreError(f"{unit.name}: array {name} has shape {block.shape}, store expects {expected}")
        start, stop = self.slot_range(unit.shard_index)
        chunk_key = rel[len(layout.array_path(unit.view, spec)) + 1:]
        # an all-fill block would get no file at all: every array gets one, so the marker lists each
        parts = encode_shard_parts(self._array(unit.view, name), chunk_key, start, stop, block,
                                   write_empty_chunks=layout.all_fill(block, FILL_VALUES.get(name, 0)))
        if parts is None:
            raise StoreError(f"{unit.name}: zarr encoded no shard file {rel} for array {name}")
        self.files.write_replace(rel, parts)
        return sha256_parts(parts), parts_size(parts)

    def read_unit(self, view: int, shard_index: int) -> UnitData:
        """The unit's arrays as zarr decodes them, unchecked: for `verify --recompute`, where the
        teacher judges the bytes whatever their checksums say, and for tests. Tools that show or
        measure a store read `read_verified_unit`."""
        start, stop = self.slot_range(shard_index)
        arrays = {name: self._array(view, name)[start:stop] for name in self.meta["arrays"]}
        factors = {n: a for n, a in arrays.items() if n not in BASE_ARRAYS}
        return UnitData(arrays["key"], arrays["label"], arrays["valid"], arrays["aug"], factors)

    def fetch_unit(self, view: int, shard_index: int) -> UnitBytes:
        """The unit's marker and shard files, each fetched once (store/unit_read.py); thread-safe I/O."""
        return fetch_unit(self.files, self.meta, view, shard_index)

    def read_checked_unit(self, fetched: UnitBytes) -> tuple[dict | None, list[str], UnitData | None]:
        """(marker, problems, data) of a fetched unit: marker None when it has none (not done); data
        only when the marker covers the metadata and every fetched byte (full check, sha256).
        A marker that fails its schema or names another job raises, as `read_marker` does."""
        if fetched.marker is None:
            return None, [], None
        where = f"{redact(self.path)}/{self.marker_path(fetched.view, fetched.shard_index)}"
        marker = parse_marker(fetched.marker, where, self.meta["cache_id"])
        problems = self.file_problems(fetched.view, fetched.shard_index, marker, fetched=fetched)
        if problems:
            return marker, problems, None
        return marker, [], decode_unit(self.meta, fetched, self.array_docs(fetched.view))

    def read_verified_unit(self, view: int, shard_index: int) -> UnitData:
        """A finished unit whose every byte its marker covers, as the trainer reads it: `show` and
        `bench fidelity --store` use it so they never draw or score bytes that training refuses.
        An unfinished or damaged unit raises StoreError naming it and the remedy."""
        marker, problems, data = self.read_checked_unit(self.fetch_unit(view, shard_index))
        where = f"{redact(self.path)}: view {view} shard {shard_index}"
        if marker is None:
            raise StoreError(f"{where} is not finished (no done marker): finish it with the same `attncache "
                             "precompute` command")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"{where} fails its integrity check: {problems[0]}{more}; {REPAIR_ADVICE}")
        return data

    def read_factors(self, view: int, slots: list[int]) -> dict[str, np.ndarray]:
        """Factor arrays for chosen slots, stacked [len(slots), ...] (one inner chunk read per slot),
        unchecked like `read_unit` (`verify --recompute` only)."""
        names = [n for n in self.meta["arrays"] if n not in BASE_ARRAYS]
        out = {}
        for name in names:
            arr = self._array(view, name)
            out[name] = np.stack([arr[s] for s in slots])
        return out

    def bytes_on_disk(self) -> int:
        return self.files.total_bytes()

    def unit_factor_bytes(self, unit: Unit) -> int:
        """Bytes of one unit's factor shard files: what the encoding costs on disk."""
        return sum(self.files.size(rel) or 0 for rel in self.unit_files(unit.view, unit.shard_index)
                   if "/factors/" in rel)
