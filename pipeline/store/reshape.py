"""A store seen at another shard count: what growing by new shards (store/grow.py) needs of zarr and digests.

Growing by shards makes every array longer on its slot axis; the units already there keep their
Zarr shard files (`c/<shard>/...`), only each array's zarr.json changes (its `shape`). What that needs:
- the arrays resized in memory only, so new units are written while the zarr.json on disk keep the
  old size and readers of the old root metadata see the old store, whole;
- a zarr.json of another length as the bytes zarr itself writes (its own serializer), so a grown
  store's zarr.json equal a store's made in one go, and a reader of the old root metadata digests a
  resized array as one of the old size while the zarr.json are rewritten (`docs_at_slots`);
- the journal `grow.json` that a grow writes first and `settle` deletes last: the old view and
  shard counts, each old view's metadata digest (what its unsettled markers hold) and the grown
  one it is valid under (an old digest is accepted only while the metadata is exactly the grown
  one, so an edit after the grow still makes those units fail), and, by being absent, that a
  store has no unsettled marker: a run on a store that is not growing reads no marker to settle.
"""
from __future__ import annotations

import json

JOURNAL = "grow.json"


def read_journal(files) -> dict | None:
    """The journal, None without one (or with one a kill left unreadable: rewritten)."""
    raw = files.read(JOURNAL)
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and {"views", "shards", "old", "new"} <= set(doc) else None


def doc_slots(doc: bytes) -> int | None:
    """The slot-axis length a zarr.json gives its array (None: not an array's metadata)."""
    try:
        shape = json.loads(doc).get("shape")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) else None


def doc_with_slots(doc: bytes, n_slots: int) -> bytes:
    """The zarr.json of the same array with `n_slots` slots, as zarr writes it."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.metadata.v3 import ArrayV3Metadata

    meta = ArrayV3Metadata.from_dict(json.loads(doc))
    meta = meta.update_shape((n_slots, *meta.shape[1:]))
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def docs_at_slots(docs: dict[str, bytes | None], n_slots: int) -> dict[str, bytes | None]:
    """`docs` as a reader of `n_slots` slots digests them: an array longer than that (resized by a
    grow whose root metadata is not written yet, or kept from before a grow's markers are settled)
    counts as one of `n_slots`; a shorter one, or any other field, is left as it is, so it fails."""
    out = {}
    for rel, doc in docs.items():
        slots = None if doc is None else doc_slots(doc)
        out[rel] = doc_with_slots(doc, n_slots) if slots is not None and slots > n_slots else doc
    return out


def resized_arrays(arrays: dict, n_slots: int) -> dict:
    """The opened zarr arrays (any key -> zarr.Array) with `n_slots` slots, in memory only: writing into
    them writes chunk files, never their zarr.json."""
    from zarr.core.array import Array, AsyncArray

    out = {}
    for key, array in arrays.items():
        inner = array._async_array
        resized = inner.metadata.update_shape((n_slots, *inner.metadata.shape[1:]))
        out[key] = Array(AsyncArray(metadata=resized, store_path=inner.store_path, config=inner.config))
    return out
