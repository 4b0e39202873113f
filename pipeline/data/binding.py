"""Which of the given shard files is each input shard of a store, and is it still the data the teacher saw.

A store records each input shard's URL (credentials redacted), count, keys digest and size; each
unit's marker records the sha256 of the tar its teacher read. Shards are matched by exact URL, else
by the longest trailing path that only one candidate shares (data may have moved: `new/a/x.tar` is
`old/a/x.tar`), and two candidates that cannot be told apart are refused, never guessed: two
`train-000000.tar` in different folders are different shards. A matched shard whose size (always,
one stat) or sha256 (on request, one read) differs from the record is refused, naming the shard.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import PurePosixPath

from attncache.pipeline._util.files import file_path
from attncache.pipeline.data.shards import DataError, redact


def _parts(url: str) -> tuple[str, ...]:
    return PurePosixPath(redact(url).split("://", 1)[-1]).parts


def _shared_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def match_urls(stored: list[str], given: list[str], where: str) -> list[str]:
    """`given` URLs in the order of `stored` (redacted URLs recorded by precompute)."""
    chosen: list[str | None] = [None] * len(stored)
    free = list(given)
    for i, url in enumerate(stored):  # exact URL: the common case, never ambiguous
        hits = [u for u in free if redact(u) == url]
        if len(hits) == 1:
            chosen[i] = hits[0]
            free.remove(hits[0])
    open_ = [i for i in range(len(stored)) if chosen[i] is None]
    tails = {(i, u): _shared_tail(_parts(stored[i]), _parts(u)) for i in open_ for u in free}
    for i in open_:
        best = max((tails[i, u] for u in free), default=0)
        if best == 0:
            continue
        hits = [u for u in free if tails[i, u] == best]
        rivals = [j for j in open_ if j != i and tails.get((j, hits[0]), 0) >= best]
        if len(hits) > 1 or rivals:
            names = hits if len(hits) > 1 else [stored[j] for j in [i, *rivals]]
            raise DataError(f"--data does not match the cache {where}: cannot tell which shard is the cache's "
                            f"shard {i} ({stored[i]}): {sorted(map(redact, names))[:5]} share the name "
                            f"{_parts(stored[i])[-1]!r}; give --data with the shards' paths as at precompute")
    for i in open_:  # second pass: each unambiguous best match, taken once
        best = max((tails[i, u] for u in free), default=0)
        hits = [u for u in free if tails[i, u] == best]
        if best and len(hits) == 1:
            chosen[i] = hits[0]
            free.remove(hits[0])
    missing = [os.path.basename(stored[i]) for i in range(len(stored)) if chosen[i] is None]
    extra = sorted(os.path.basename(u) for u in free)
    if missing or extra:
        raise DataError(f"--data does not match the cache {where}: "
                        + (f"shards in the cache but not in --data: {missing[:5]} " if missing else "")
                        + (f"shards in --data but not in the cache: {extra[:5]}" if extra else ""))
    return [c for c in chosen if c is not None]


def local_size(url: str) -> int | None:
    path = file_path(url)
    if path is None:
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def shard_sha256(url: str) -> str:
    """sha256 of the tar's bytes, read in 1 MiB blocks (what the teacher read)."""
    digest = hashlib.sha256()
    path = file_path(url)
    if path is None:
        import fsspec
        opener = fsspec.open(url, "rb")
    else:
        opener = open(path, "rb")
    with opener as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def members_sha256(url: str) -> str | None:
    """sha256 of every member's name and size, in tar order: the cheap check's fingerprint of a
    shard's contents. Reading it costs one 512-byte header per member (the data is seeked over), and
    it changes when any image is re-encoded, which the tar's size, padded to 10 KiB records, hides.
    None for remote or compressed shards, where reading the headers means reading everything."""
    path = file_path(url)
    if path is None or not path.endswith(".tar"):
        return None
    digest = hashlib.sha256()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                digest.update(f"{info.name}\t{info.size}\n".encode("utf-8", "surrogateescape"))
    except (OSError, tarfile.TarError):
        return None
    return digest.hexdigest()


def check_members(records: list[tuple[int, str | None, str]], where: str) -> None:
    """The cheap check of contents: each shard's member names and sizes against what its units recorded."""
    seen: dict[str, str | None] = {}
    for index, digest, url in records:
        if digest is None:
            continue
        if url not in seen:
            seen[url] = members_sha256(url)
        if seen[url] is not None and seen[url] != digest:
            raise DataError(f"{redact(url)}: its members (names and sizes) differ from those of shard {index} when the "
                            f"cache {where} was made: the shard changed since precompute, so its images are not the "
                            "ones the teacher saw; give the data as it was, or precompute anew")


def marker_records(store, urls: list[str], field: str) -> list[tuple[int, str | None, str]]:
    """(shard index, the digest `field` its units' markers recorded, URL) for every unit with a marker."""
    from attncache.storage_schema import SchemaError

    records = []
    for unit in store.units():
        try:
            marker = store.read_marker(unit.view, unit.shard_index)
        except SchemaError:  # the quick checks and verify report it; nothing to compare here
            marker = None
        if marker is not None:
            records.append((unit.shard_index, marker.get(field), urls[unit.shard_index]))
    return records


def check_sizes(shards: list[dict], urls: list[str], where: str) -> None:
    """The cheap check, always: a local shard whose size is not the recorded one changed since precompute."""
    for index, (info, url) in enumerate(zip(shards, urls)):
        recorded, now = info.get("size_bytes"), local_size(url)
        if recorded is not None and now is not None and recorded != now:
            raise DataError(f"{redact(url)}: {now} bytes, but the cache {where} was made from shard {index} "
                            f"({info['url']}) of {recorded} bytes: the shard changed since precompute, so its "
                            "images are not the ones the teacher saw; give the data as it was, or precompute anew")


def check_digests(records: list[tuple[int, str | None, str]], where: str) -> None:
    """The full check, on request: every byte of each shard against the sha256 its units recorded
    (`records`: shard index, recorded digest, URL); each shard is read once."""
    seen: dict[str, str] = {}
    for index, digest, url in records:
        if digest is None:
            continue
        actual = seen.get(url) or seen.setdefault(url, shard_sha256(url))
        if actual != digest:
            raise DataError(f"{redact(url)}: sha256 differs from the one recorded when the cache {where} was made "
                            f"from shard {index}: the shard changed since precompute, so its images are not the "
                            "ones the teacher saw; give the data as it was, or precompute anew")


def check_store_data(store, data: tuple[str, ...], full: bool) -> list[str]:
    """The shards bound to the store's shards and checked: size and members always, and with `full`
    (`train --check-data full`) every shard's bytes against the sha256 its units recorded."""
    shards = store.meta["dataset"]["shards"]
    where = redact(store.path)
    urls = match_urls([s["url"] for s in shards], expand_list(data), where)
    check_sizes(shards, urls, where)
    check_members(marker_records(store, urls, "shard_members_sha256"), where)
    if full:
        check_digests(marker_records(store, urls, "shard_sha256"), where)
    return urls


def expand_list(data) -> list[str]:
    from attncache.pipeline.data.shards import expand_shards

    return expand_shards(list(data))
