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
from pathlib import PurePosixPath

from pipeline.data import DataError, redact


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
    if "://" in url and not url.startswith("file://"):
        return None
    try:
        return os.path.getsize(url.removeprefix("file://"))
    except OSError:
        return None


def shard_sha256(url: str) -> str:
    """sha256 of the tar's bytes, read in 1 MiB blocks (what the teacher read)."""
    digest = hashlib.sha256()
    if "://" in url and not url.startswith("file://"):
        import fsspec
        opener = fsspec.open(url, "rb")
    else:
        opener = open(url.removeprefix("file://"), "rb")
    with opener as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
    """`train --check-data`: the shards bound to the store's shards, sizes checked, and with `full`
    every shard's bytes against the sha256 its units' markers recorded; returns the bound URLs."""
    shards = store.meta["dataset"]["shards"]
    where = redact(store.path)
    urls = match_urls([s["url"] for s in shards], expand_list(data), where)
    check_sizes(shards, urls, where)
    if full:
        records = []
        for unit in store.units():
            marker = store.read_marker(unit.view, unit.shard_index)
            records.append((unit.shard_index, None if marker is None else marker["shard_sha256"], urls[unit.shard_index]))
        check_digests(records, where)
    return urls


def expand_list(data) -> list[str]:
    from pipeline.data import expand_shards

    return expand_shards(list(data))
