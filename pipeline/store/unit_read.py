"""A unit read for training: its marker and every Zarr shard file fetched once, decoded from those bytes.

The loader checks each unit it reads against its marker (size and sha256 of every shard file), and
decoding through zarr's own store would fetch the same files again (a HEAD and ranged GETs per
array on an object store). So the bytes are fetched once (`fetch_unit`, pure I/O: what a prefetch
thread runs), checked, and decoded by zarr's codec pipeline from an in-memory store that holds just
those files and the view's array metadata (`decode_unit`): the same `zarr.json` bytes the marker's
`metadata_sha256` covers, so what is decoded is exactly what was checked.
"""
from __future__ import annotations

from dataclasses import dataclass

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from attncache.pipeline._util.files import Files
from attncache.pipeline.store import layout
from attncache.pipeline.store.layout import BASE_ARRAYS, UnitData
from attncache.pipeline.store.markers import sha256_hex


@dataclass(frozen=True)
class UnitBytes:
    """What one unit's read fetched: the marker's bytes (None: no marker) and each of the layout's
    shard files by store-relative path (None: missing; not fetched at all without a marker)."""

    view: int
    shard_index: int
    marker: bytes | None
    files: dict[str, bytes | None]

    def size(self, rel: str) -> int | None:
        data = self.files.get(rel)
        return None if data is None else len(data)

    def sha256(self, rel: str) -> str | None:
        return sha256_hex(self.files.get(rel))


def fetch_unit(files: Files, meta: dict, view: int, shard_index: int) -> UnitBytes:
    """The unit's marker, then each shard file the layout gives it, each read once, whole."""
    marker = files.read(layout.marker_path(view, shard_index))
    rels = layout.unit_files(meta, view, shard_index) if marker is not None else []
    return UnitBytes(view, shard_index, marker, {rel: files.read(rel) for rel in rels})


def decode_unit(meta: dict, fetched: UnitBytes, array_docs: dict[str, bytes | None]) -> UnitData:
    """The unit's slots of every array, decoded from `fetched` (checked against its marker first)
    with the view's array metadata `array_docs` (path of each `zarr.json` -> its bytes)."""
    prototype = default_buffer_prototype()
    slots_per_shard = int(meta["dataset"]["slots_per_shard"])
    start, stop = layout.slot_range(fetched.shard_index, slots_per_shard)
    rels = layout.unit_files(meta, fetched.view, fetched.shard_index)
    arrays = {}
    for (name, spec), rel in zip(meta["arrays"].items(), rels):
        path = layout.array_path(fetched.view, spec)
        doc = f"{path}/zarr.json"
        store = MemoryStore({doc: prototype.buffer.from_bytes(array_docs[doc]),
                             rel: prototype.buffer.from_bytes(fetched.files[rel])})
        arrays[name] = zarr.open_array(store, path=path, mode="r", zarr_format=3)[start:stop]
    factors = {n: a for n, a in arrays.items() if n not in BASE_ARRAYS}
    return UnitData(arrays["key"], arrays["label"], arrays["valid"], arrays["aug"], factors)
