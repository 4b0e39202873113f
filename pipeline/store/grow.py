"""Growing a store: more views (`precompute --views 8` on a 4-view store writes views 4..7 only) or
more shards of the same data set (`--data` naming the old shards, then new ones, writes the new
shards' units only).

A unit's bytes do not depend on how many views or shards exist (augmentation is drawn from seed,
key and view; a unit owns its own Zarr shard files at `slot = shard_index * slots_per_shard + i`),
and the cache id leaves the data set and `views` out, so a grown store ends byte-identical to one
made in one go. "The same data set" (`grown_dataset`): the store's shards, unchanged (count, keys,
and at resume their size and members, pipeline/data/binding.py), first and in their order, new
shards after them, none holding more samples than the store's slots per shard (a bigger one would
lay out every unit of a store made in one go differently). One kind of growth per run.

The order keeps every state a kill can leave usable and resumable:

1. a journal (`grow.json`: the old view and shard counts) is written; the new views' arrays are
   created (only those whose zarr.json is missing or of another size, so a resumed grow never drops
   a done unit); for new shards the arrays are resized in memory only (store/reshape.py): the
   arrays' zarr.json on disk keep the old size. The new units are written under the grown
   metadata, held in memory: the root metadata still says the old counts, so readers see the old
   store, whole;
2. when every new unit is done, the resized arrays' zarr.json are written (each atomically; a reader
   of the old root metadata digests a bigger array as one of its own size, store/reshape.py), then
   the root metadata (one atomic rename): it never claims a unit that is not done;
3. the older markers, written under the old metadata (still accepted, store/integrity.py and the
   journal), are rewritten with the current digest, each atomically, and the journal is deleted;
   every later run finishes this (`settle`), and a run that finds no journal reads no marker.

Shrinking is refused: a store never drops views or shards (train reads what it holds). Growing a
store at an fsspec URL is refused (the old-path rule for object stores has no half-made states).
"""
from __future__ import annotations

import json

from attncache.pipeline.data.shards import DatasetManifest, redact
from attncache.pipeline.store.markers import encode_marker
from attncache.pipeline.store.meta import META_ATTR, StoreError
from attncache.pipeline.store.reshape import JOURNAL, read_journal

_SHARD_FIELDS = ("count", "keys_sha256", "errors")  # what says a shard is the same; url/size: where it lies


def refuse_shrink(path: str, old_views: int, new_views: int) -> None:
    raise StoreError(f"{redact(path)} holds {old_views} views and --views {new_views} asks for fewer: a store is "
                     f"never shrunk; nothing was changed. Give --views {old_views} to resume it, or more to grow it")


def refuse_remote(path: str, old: dict, new: dict) -> None:
    raise StoreError(f"{redact(path)}: growing a store on an object store is not supported ({_what_grows(old, new)}); "
                     "nothing was changed: grow a local copy and upload it, or precompute into a new --out")


def refuse_both(path: str, old: dict, new: dict) -> None:
    raise StoreError(f"{redact(path)}: grow views or shards, not both in one run ({_what_grows(old, new)}); nothing "
                     f"was changed: first add the shards with --views {old['views']}, then run with --views "
                     f"{new['views']}")


def _what_grows(old: dict, new: dict) -> str:
    parts = [f"views {old['views']} -> {new['views']}"] if old["views"] != new["views"] else []
    a, b = len(old["dataset"]["shards"]), len(new["dataset"]["shards"])
    return ", ".join(parts + ([f"shards {a} -> {b}"] if a != b else [])) or "no change"


def _same_shard(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in _SHARD_FIELDS)


def grown_dataset(path: str, old: dict, new: dict) -> dict:
    """`new`'s data set with the store's shards as the store records them (their URLs as at precompute,
    bound to --data at run time like a resume's) and the new shards after them; StoreError naming the
    first store shard that --data changes or leaves out, or a new shard too big for the layout."""
    where, olds, news = redact(path), old["dataset"]["shards"], new["dataset"]["shards"]
    for i, shard in enumerate(olds):
        if i >= len(news):
            raise StoreError(f"{where} holds a different cache: its shard {i} ({shard['url']}) is not in --data: a "
                             f"store never drops shards; nothing was changed. Give its {len(olds)} shards first, in "
                             "their order, then any new ones")
        if not _same_shard(shard, news[i]):
            what = [f"{k} {shard.get(k)!r:.40} -> {news[i].get(k)!r:.40}" for k in _SHARD_FIELDS
                    if shard.get(k) != news[i].get(k)]
            raise StoreError(f"{where} holds a different cache: its shard {i} ({shard['url']}) is not --data's "
                             f"shard {i} ({news[i]['url']}: {'; '.join(what)}); nothing was changed. To grow a store, "
                             "give its shards unchanged, first and in their order, then the new ones")
    slots = old["dataset"]["slots_per_shard"]
    for j, shard in enumerate(news[len(olds):], start=len(olds)):
        if shard["count"] > slots:
            raise StoreError(f"{where}: cannot grow by --data's shard {j} ({shard['url']}): it holds {shard['count']} "
                             f"samples, more than the {slots} slots per shard the store was laid out with (its "
                             "largest shard), and a store made in one go with it would lay out every unit "
                             "differently; nothing was changed. Precompute into a new --out")
    shards = [dict(s) for s in olds] + [dict(s) for s in news[len(olds):]]
    dataset = dict(new["dataset"], shards=shards, slots_per_shard=slots, num_slots=slots * len(shards))
    dataset["fingerprint"] = DatasetManifest.from_json(dataset).fingerprint
    return dict(new, dataset=dataset)


def open_grown(cls, path: str, old: dict, meta: dict, fields: list[str]):
    """The store opened to grow from `old` (its root metadata) to `meta`, which differ (`fields`, URLs
    left out) in views or the data set only; StoreError for shrinking, a changed or dropped shard, or
    both kinds at once; None when the shards are the store's but the data set differs otherwise (not
    a grow: the caller refuses it as another job's)."""
    if meta["views"] < old["views"]:
        refuse_shrink(path, old["views"], meta["views"])
    if len(meta["dataset"]["shards"]) == len(old["dataset"]["shards"]):
        if "dataset" in fields:
            grown_dataset(path, old, meta)  # names a changed shard
            return None
        return open_growing(cls, path, meta)
    meta = grown_dataset(path, old, meta)
    if meta["views"] != old["views"]:
        refuse_both(path, old, meta)
    return open_growing(cls, path, meta)


def open_growing(cls, path: str, meta: dict):
    """The store at `path` (fewer views or shards than `meta`) opened to grow: the journal written, the
    new views' missing arrays created or every array resized in memory, the grown metadata in memory
    only (written by `settle` once the new units are done)."""
    store = cls.open(path, mode="r+")
    old_views, old_shards = store.meta["views"], store.num_shards
    journal = read_journal(store.files)
    if journal is not None and (journal["views"], journal["shards"]) != (old_views, old_shards):
        settle(store)  # an earlier, finished grow's older markers first: one grow's digests at a time
    old_digests = {str(v): store.metadata_sha256(v) for v in range(old_views)}
    store.start_growing(meta)
    if old_shards < store.num_shards:
        store.resize_arrays_in_memory()
    store.create_view_arrays(range(old_views, meta["views"]), only_missing=True)
    want = {"views": old_views, "shards": old_shards, "old": old_digests,
            "new": {v: store.metadata_sha256(int(v)) for v in old_digests}}
    if read_journal(store.files) != want:  # the same grow resumed (or another Ray worker's) wrote it already
        store.files.write_atomic(JOURNAL, json.dumps(want, sort_keys=True).encode())
    return store


def settle(store) -> bool:
    """Finish a grow: write the resized arrays' and the root metadata once every unit is done, then give
    each older marker the current digest and delete the journal. Without a journal (a store that is
    not growing and whose last grow finished) nothing is read or written.
    Returns whether the store's root metadata now holds every view and shard."""
    if store.growing:
        if any(not store.unit_done(u) for u in store.units()):
            return False
        for rel, doc in store.pending_docs.items():
            store.files.write_atomic(rel, doc)
        store.group.attrs[META_ATTR] = store.meta
        store.settled_on_disk()
    if not store.files.is_file(JOURNAL):
        return True
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
    store.files.delete(JOURNAL)
    store.files.remove_temps(JOURNAL, ".tmp-*")
    return True

