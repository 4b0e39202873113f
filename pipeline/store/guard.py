"""What `precompute --out PATH` finds at PATH, and what it may do there without losing work.

- nothing (or only the precompute lease): a new store is created;
- a store being created when its writer was killed (only `zarr.json` files, no root metadata, no
  marker, no data): its creation is finished;
- this job's store: resumed;
- this job's store with fewer views than asked, or with the first of the shards asked: grown
  (store/grow.py); with more views or shards: refused; at an fsspec URL: growing is refused;
- another job's store: refused, naming the fields that differ;
- a store whose root metadata is missing, unreadable or edited while it holds markers or data, or
  anything that is not a store: refused, and nothing is changed. `--repair` restores the root
  metadata from this job only when the units' markers show that this job wrote them (their
  `metadata_sha256` is this job's); the store is then byte-identical to one never damaged.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import PurePosixPath

import zarr

from attncache.pipeline._util.files import Files, is_local
from attncache.pipeline.data.shards import redact
from attncache.pipeline.store.grow import open_grown, refuse_remote
from attncache.pipeline.store.integrity import REPAIR_ADVICE, array_doc_paths, metadata_sha256
from attncache.pipeline.store.meta import META_ATTR, StoreError, cache_id, require_same_job
from attncache.storage_schema import SchemaError, validate_store_metadata

LEASE_PREFIX = "precompute.lease"
MARKER_FILE = re.compile(r"units/[^/]+/[^/]+\.json")  # what a glob of units/*/*.json finds


def _files(path: str) -> list[str]:
    """Every file under a local store, relative, the lease left out."""
    return [r for r in Files(path).local_files() if not PurePosixPath(r).name.startswith(LEASE_PREFIX)]


def _half_created(rels: list[str]) -> bool:
    """Only group and array metadata: what a creation killed before its root metadata leaves."""
    return all(r == "zarr.json" or (r.startswith("views/") and r.endswith("/zarr.json")) for r in rels)


def _root_metadata(path: str) -> tuple[dict | None, str]:
    """The root metadata if it can be trusted, else None and why not."""

    files = Files(path)
    if not files.is_file("zarr.json"):
        return None, "is missing"
    try:
        doc = json.loads(files.read("zarr.json"))
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"is not JSON ({exc})"
    meta = doc.get("attributes", {}).get(META_ATTR) if isinstance(doc, dict) and \
        isinstance(doc.get("attributes"), dict) else None
    if meta is None:
        return None, "holds no attncache metadata"
    try:
        validate_store_metadata(meta, where="zarr.json")
    except SchemaError as exc:
        return None, f"holds metadata that fails its schema ({' '.join(str(exc).split())})"
    if meta["cache_id"] != cache_id(meta):
        return None, "holds metadata edited after creation (its cache_id does not match its contents)"
    return meta, ""


def _markers(path: str) -> list[dict]:
    files, out = Files(path), []
    for rel in _files(path):
        if not MARKER_FILE.fullmatch(rel):
            continue
        try:
            marker = json.loads(files.read(rel))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(marker, dict):
            out.append(marker)
    return out


def markers_vouch_for(path: str, meta: dict) -> tuple[int, int]:
    """(markers written under `meta`, markers written under other metadata): the array metadata on
    disk and `meta` together must hash to what each marker recorded."""
    files, digests = Files(path), {}
    for view in range(meta["views"]):
        docs = {rel: files.read(rel) if files.is_file(rel) else None for rel in array_doc_paths(meta, view)}
        digests[view] = metadata_sha256(meta, docs)
    agree = other = 0
    for marker in _markers(path):
        if marker.get("metadata_sha256") == digests.get(marker.get("view")):
            agree += 1
        else:
            other += 1
    return agree, other


def comparable(meta: dict) -> dict:
    """The metadata less what may change without changing the job: the cache id and the shards'
    locations (data may move; its bytes are checked by size and digest)."""
    out = {k: v for k, v in meta.items() if k != "cache_id"}
    out["dataset"] = dict(meta["dataset"], shards=[{k: v for k, v in s.items() if k not in ("url", "size_bytes")}
                                                   for s in meta["dataset"]["shards"]])
    return out


def _restore(path: str, meta: dict) -> None:
    """Write the root group's metadata again (only the root zarr.json; no array, marker or data file)."""

    Files(path).delete("zarr.json")
    group = zarr.open_group(path, mode="a", zarr_format=3)
    group.attrs[META_ATTR] = meta


def _untrusted(path: str, why: str, meta: dict, repair: bool, rels: list[str]) -> bool:
    """A store with data but without metadata it can trust: restore it (True) or refuse."""
    agree, other = markers_vouch_for(path, meta)
    where = redact(path)
    if repair and agree and not other:
        _restore(path, meta)
        return True
    if repair:
        raise StoreError(f"{where}: zarr.json {why}, and --repair cannot restore it: {agree} of the store's "
                           f"{agree + other} unit markers were written by this job's metadata; nothing was changed. "
                           "Run the command that made the store (same --data paths and options) with --repair, "
                           "restore zarr.json from a backup, or give another --out")
    markers = sum(1 for r in rels if r.startswith("units/"))
    raise StoreError(f"{where}: zarr.json {why}, but the store holds {markers} unit markers and "
                       f"{len(rels) - markers} other files: its metadata was lost or edited, so nothing was changed. "
                       f"To restore it, {REPAIR_ADVICE} (done only when the markers show this job wrote the units), "
                       "or give another --out")


def open_existing_or_none(cls, path: str, meta: dict, repair: bool):
    """The store at `path` to resume, or None when a new store may be created there; else StoreError."""

    if not is_local(path):  # object stores: no listing of half-made states; the old rule
        return _open_remote(cls, path, meta)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"--out {redact(path)} is a file, not a store directory: give a new or empty --out")
    rels = _files(path)
    old, why = _root_metadata(path)
    if old is None:
        if _half_created(rels):
            return None
        looks_like_store = any(r.startswith(("units/", "views/")) for r in rels)
        if not looks_like_store:
            raise StoreError(f"{redact(path)} exists and is not an attncache store (it holds {rels[:5]}): "
                               "give a new or empty --out; nothing was changed")
        _untrusted(path, why, meta, repair, rels)
        return cls.open(path, mode="r+")
    fields = sorted(k for k in comparable(meta) if comparable(old).get(k) != comparable(meta).get(k))
    agree, other = markers_vouch_for(path, meta) if fields else (0, 0)
    if fields and set(fields) <= {"views", "dataset"} and (other or not agree):  # this job with other views
        grown = open_grown(cls, path, old, meta, fields)  # or shards (not an edited root metadata, which the markers
        if grown is not None:                     # would show): grown (store/grow.py)
            return grown
    if fields:
        if not agree or other:
            require_same_job(path, old, meta)  # another job's store: names what differs
            raise StoreError(f"{redact(path)} holds a different cache (fields {fields} differ from this run's). "
                               "Use another --out, or delete the store.")
        _untrusted(path, f"holds metadata that differs from this job's in {fields} although the units' markers "
                         "show this job wrote them (edited after creation)", meta, repair, rels)
    return cls.open(path, mode="r+")


def _open_remote(cls, path: str, meta: dict):

    try:
        group = zarr.open_group(path, mode="r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if META_ATTR not in dict(group.attrs):
        return None if not list(group.keys()) else _refuse_remote(path)
    store = cls.open(path, mode="r+")
    if store.meta["views"] != meta["views"] or store.num_shards != len(meta["dataset"]["shards"]):
        refuse_remote(path, store.meta, meta)
    require_same_job(path, store.meta, meta)
    return store


def _refuse_remote(path: str):
    raise StoreError(f"{redact(path)}: zarr.json holds no attncache metadata but the store holds arrays; nothing "
                       "was changed: restore zarr.json from a backup or give another --out")
