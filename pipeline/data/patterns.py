"""What users type for `--data`, turned into shard URLs.

Three forms, freely combined: brace patterns (`'d/train-{000000..000009}.tar'`), lists (`--data`
given several times, or a list here), and globs (`'d/*.tar'`, `'d/train-??????.tar'`,
`'s3://bucket/train-*.tar'`). Braces are expanded first, so `'d/{train,val}-*.tar'` is two globs.
Lists and brace patterns keep the order written (a brace range is already in order); each glob's
matches are taken in sorted order, so the shard order (and with it every store's bytes) does not
depend on a directory listing's order. A URL that appears twice is used once, where it first
appears. Local globs go through `glob` (`**` spans folders), URLs through the fsspec backend's own
glob; only files match, never folders.

Everything that matches nothing is refused here, before any work, in one line naming it: a glob
with no match, and a local path that does not exist. A plain URL (no glob) is not looked up: its
shard is opened when it is read, which names it if it is missing.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Sequence

import braceexpand

from attncache.pipeline._util.files import is_local
from attncache.pipeline.data.errors import DataError, redact

_GLOB = re.compile(r"[*?\[]")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns, lists and globs to shard URLs (see the module docstring), without repeats."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            for url in _matches(pattern, item):
                if url not in urls:
                    urls.append(url)
    if not urls:
        raise DataError(f"data pattern {redact(repr(spec))} matches no shards")
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"data pattern {redact(repr(spec))}: no such shard file(s): {redact(shown)}")
    return urls


def _matches(pattern: str, item: str) -> list[str]:
    """`item` itself when it holds no glob character (or names a file as written), else its
    matches in sorted order; a glob that matches nothing is a DataError naming it."""
    if not _GLOB.search(item) or (is_local(item) and os.path.isfile(item)):
        return [item]
    found = _url_glob(item) if not is_local(item) else sorted(p for p in glob.glob(item, recursive=True)
                                                          if os.path.isfile(p))
    if not found:
        where = "" if item == pattern else f" (from {redact(repr(pattern))})"
        raise DataError(f"data glob {redact(repr(item))}{where} matches no files")
    return found


def _url_glob(item: str) -> list[str]:
    """Matches of a URL glob, each written with the URL's own text up to its first globbed folder
    (scheme, bucket, anything the user put there), so a glob and the brace pattern of the same
    shards give the same URLs, and with them the same store."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(item)
        found = fs.glob(path, detail=True)
    except (OSError, ValueError) as exc:
        raise DataError(redact(f"data glob {item!r}: cannot list ({exc})", item)) from None
    names = sorted(name for name, info in found.items() if info.get("type") == "file")
    user_base, fs_base = _base(item), _base(path)
    return [user_base + name[len(fs_base):] if name.startswith(fs_base) else fs.unstrip_protocol(name)
            for name in names]


def _base(text: str) -> str:
    """The text up to and including the last "/" before the first glob character."""
    return text[:text.rfind("/", 0, _GLOB.search(text).start()) + 1]
