"""Growing a store's views: `precompute --views 8` on a 4-view store writes views 4..7 only.

A unit's bytes do not depend on how many views exist (augmentation is drawn from seed, key and
view), and the cache id leaves `views` out, so a grown store ends byte-identical to one made with
all its views at once. The order keeps every state a kill can leave usable and resumable:

1. the new views' arrays are created (only those whose zarr.json is missing, so a resumed grow
   never drops a done unit), and their units written under the grown metadata, held in memory:
   the root metadata still says the old count, so readers see the old store, whole;
2. when every unit of the new views is done, the root metadata is rewritten (one atomic rename)
   with the new count: it never claims a view whose units are not done;
3. the old views' markers, written under the old count (still accepted, store/integrity.py), are
   rewritten with the current digest, each atomically; every later run finishes this (`settle`).

Shrinking is refused: a store never drops views (train reads the views it holds).
"""
from __future__ import annotations

import json

from attncache.pipeline.data.shards import redact
from attncache.pipeline.store.markers import encode_marker
from attncache.pipeline.store.meta import META_ATTR, StoreError


def refuse_shrink(path: str, old_views: int, new_views: int) -> None:
    raise StoreError(f"{redact(path)} holds {old_views} views and --views {new_views} asks for fewer: a store is "
                     f"never shrunk; nothing was changed. Give --views {old_views} to resume it, or more to grow it")


def open_growing(cls, path: str, meta: dict):
    """The store at `path` (fewer views than `meta`) opened to grow: the new views' missing arrays
    created, the grown metadata in memory only (written by `settle` once the new units are done)."""
    store = cls.open(path, mode="r+")
    store.meta = meta
    store.create_view_arrays(range(store.views_on_disk, meta["views"]), only_missing=True)
    return store


def settle(store) -> bool:
    """Finish a grow: write the root metadata once every unit of the store's views is done, then give
    each older marker the current digest. A no-op (no write) on a store that is not growing.
    Returns whether the store's root metadata now holds every view."""
    if store.views_on_disk < store.meta["views"]:
        if any(not store.unit_done(u) for u in store.units()):
            return False
        store.group.attrs[META_ATTR] = store.meta
        store.views_on_disk = store.meta["views"]
    for unit in store.units():
        raw = store.files.read(store.marker_path(unit.view, unit.shard_index))
        current = store.metadata_sha256(unit.view)
        if raw is None:
            continue
        marker = json.loads(raw)
        if marker.get("metadata_sha256") != current and not store.unit_problems(unit.view, unit.shard_index):
            rel = store.marker_path(unit.view, unit.shard_index)
            store.files.write_atomic(rel, encode_marker(dict(marker, metadata_sha256=current)))
            store.files.remove_temps(rel, ".tmp-*")  # what a rewrite killed before its rename left
    return True
