"""When a unit counts as done: its marker covers the store's metadata and every file the unit holds.

A marker records `metadata_sha256`: sha256 over the store's metadata (every field, canonical JSON)
and the sha256 of each of the view's array metadata files (`zarr.json`: dtype, codecs, fill value).
Every edit that changes what a reader decodes (teacher.scale, encoding, layers, heads, tokens, the
dataset's shards, an array's dtype ...) changes that digest, so the units written before the edit
stop counting as done: `verify` names them, `train` refuses them, `precompute --repair` restores the
metadata when the markers prove the same job wrote them. The marker also lists every Zarr shard file
the unit owns with its sha256 and size: a marker that leaves a file out, or gives it no digest, never
makes a unit done. The cheap check (sizes) is what resume and `train`'s start use; the full check
(sha256 of every byte) is what `verify`, `--repair` and the loader's read of a unit use.

The view count is the one field a marker may have been written under a smaller value of: a store
grown from n views (pipeline/store/grow.py) holds markers of views 0..n-1 written under `views: n`,
and no unit's bytes depend on how many views exist. `grown_digests` lists those digests; the grow
rewrites such markers to the current digest as its last step, so a finished grow's markers are those
of a store made in one go.
"""
from __future__ import annotations

import hashlib
import json

REPAIR_ADVICE = "re-run the same `attncache precompute` command with --repair"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def array_doc_paths(meta: dict, view: int) -> list[str]:
    """Store-relative paths of the view's array metadata files."""
    return sorted(f"views/{view}/{spec['path']}/zarr.json" for spec in meta["arrays"].values())


def metadata_sha256(meta: dict, array_docs: dict[str, bytes | None]) -> str:
    """Digest of what a reader of one view decodes with: the root metadata and its arrays' zarr.json."""
    digest = hashlib.sha256(canonical(meta))
    for rel in sorted(array_docs):
        doc = array_docs[rel]
        digest.update(f"\n{rel}\t{'missing' if doc is None else hashlib.sha256(doc).hexdigest()}".encode())
    return digest.hexdigest()


def grown_digests(meta: dict, view: int, array_docs: dict[str, bytes | None]) -> list[str]:
    """The digests a marker of `view` may hold, the current one first: the metadata as it is, then
    with `views` = n for every smaller n that still holds the view (a grow killed before its markers
    were rewritten)."""
    counts = [meta["views"]] + list(range(meta["views"] - 1, view, -1))
    return [metadata_sha256(dict(meta, views=n), array_docs) for n in counts]


def coverage_problems(marker: dict, expected_files: list[str], store_digests: str | list[str]) -> list[str]:
    """What the marker fails to cover: the store's metadata as it is now (or as it was before a
    grow, `grown_digests`), and every file of the unit."""
    problems = []
    accepted = [store_digests] if isinstance(store_digests, str) else list(store_digests)
    store_digest = accepted[0]
    if marker["metadata_sha256"] not in accepted:
        problems.append(f"marker was written under other store metadata (metadata_sha256 "
                        f"{marker['metadata_sha256'][:12]}, the store's is {store_digest[:12]}): the store's "
                        "metadata (zarr.json) was edited after this unit was written")
    expected = set(expected_files)
    for what in ("files", "sizes"):
        if set(marker[what]) != expected:
            problems.append(f"marker {what} list {sorted(set(marker[what]) ^ expected)} that the layout does "
                            "not agree on (a marker must cover every array of its unit)")
    return problems


def content_problems(marker: dict, size_of, sha256_of, full: bool) -> list[str]:
    """Where the files differ from the marker: existence and size always, every byte when `full`."""
    problems = []
    for rel in sorted(marker["files"]):
        size = size_of(rel)
        if size is None:
            problems.append(f"missing in {rel}" if full else f"missing {rel}")
        elif full and sha256_of(rel) != marker["files"][rel]:
            problems.append(f"checksum mismatch in {rel}")
        elif not full and size != marker["sizes"].get(rel):
            problems.append(f"checksum mismatch in {rel} (size {size} bytes, the marker records "
                            f"{marker['sizes'].get(rel)})")
    return problems
