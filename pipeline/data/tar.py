"""Reading webdataset tar shards so that every member the tar holds lands in exactly one entry.

An entry is a sample (consecutive members sharing a key, webdataset's grouping) that is either
usable or carries an `error` saying why not; nothing the tar holds is dropped before counting
(invariant 5). Members that are not sample data (directories, symbolic links, devices, FIFOs,
sparse or unknown types, names without an extension or not valid UTF-8) make their sample an
error entry instead of vanishing. Hard links are resolved as GNU tar means them: the link *is* the
earlier regular member of that name (GNU tar stores a file it meets twice, or a file with several
names, as a link), so its bytes are read from the target; a link with no regular target earlier
in the shard is an error. Symbolic links are never followed (they could point anywhere).

A sample's members are read only while their declared sizes stay within `max_sample_bytes`; a
bigger sample becomes an error entry and its members are skipped in the stream unread, so a small
compressed shard with a huge member cannot take the memory (tarfile skips by reading in 10 KiB
blocks). A tar cut short, with a corrupt header, without its end-of-archive marker, or with data
after that marker, ends with an error entry instead of silently losing the rest.

What is webdataset's and what is ours. Grouping members into samples is webdataset's
`group_by_keys`, with `base_plus_ext` for the key, and a recording handler (`_Recorder`): the one
member it refuses to store (an extension repeated within a sample) is kept with its sample and
counted instead of dropped. Suffixes are handed to it with a leading "." so that no member can
collide with its own `__key__`, `__url__` and `__bad__` entries (a member `x.__bad__` would
otherwise make it drop the whole sample silently); the leading "." is removed again here.
Reading the members is ours (`_members`), not webdataset's `tar_file_iterator`, because that
iterator cannot keep this module's promises, and no handler or wrapper can restore them in one pass:
- it skips every member that is not a regular file (directories, links, devices; hard links
  too, so GNU tar's second name of a file is lost) and names like `__x__` with `continue`,
  before any handler sees them: such members could be neither counted nor recorded;
- it reads each member it selects in full before anything sees its size (`select_files` gets
  the name only), so `--max-sample-bytes` could not stop a 1 GiB member reaching memory;
- it opens the TarFile itself, and tarfile ends iteration silently at an unreadable header after
  the first member, so a corrupt or truncated tar would look complete (we keep the last header
  block, `_TrackedInfo`, to tell an end-of-archive marker from garbage or a cut).
Pre-filtering for it at the tarfile level would need a second pass over every shard (a second
download from an object store, a second gunzip), so the member reader stays ours.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator, Mapping

from webdataset.tariterators import base_plus_ext, group_by_keys

from attncache.pipeline._util.files import is_local
from attncache.pipeline.data.errors import DataError, redact

DEFAULT_MAX_SAMPLE_BYTES = 64 * 2**20
MAX_SAMPLE_BYTES_RANGE = (1024, 2**40)  # what --max-sample-bytes accepts: 1 KiB to 1 TiB
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)
_TYPE_NAMES = {tarfile.DIRTYPE: "directory member (holds no sample data)",
               tarfile.SYMTYPE: "symbolic link (not followed)",
               tarfile.CHRTYPE: "character device member (not a regular file)",
               tarfile.BLKTYPE: "block device member (not a regular file)",
               tarfile.FIFOTYPE: "FIFO member (not a regular file)"}


def open_url(url: str):
    if not is_local(url):
        import fsspec
        return fsspec.open(url, "rb").open()
    return open(url, "rb")


@dataclass(frozen=True)
class ShardEntry:
    """One sample as stored in the tar, before decoding; `names` are the tar members it holds
    (used with it, or recorded with its error), so members in the tar = sum of len(names)."""

    position: int
    key: str
    members: Mapping[str, bytes]
    error: str | None = None
    names: tuple[str, ...] = ()


def check_max_sample_bytes(value: int) -> int:
    lo, hi = MAX_SAMPLE_BYTES_RANGE
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"--max-sample-bytes must be an integer from {lo} to {hi}, not {value!r}")
    return value


def iter_shard(url: str, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[ShardEntry]:
    """Samples in tar order; broken ones carry an error instead of raising. A file that is not a
    tar at all (or is empty) is a DataError: nothing of it can be counted."""
    check_max_sample_bytes(max_sample_bytes)
    try:
        fileobj = open_url(url)
    except OSError as exc:
        raise DataError(redact(f"{url}: cannot open shard ({exc})", url)) from None
    with fileobj, _Links(url) as links:
        try:
            stream = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_TrackedInfo, encoding="utf-8",
                                  errors="surrogateescape")
        except tarfile.TarError as exc:
            raise DataError(redact(f"{url}: not a readable tar file ({exc})", url)) from None
        yield from _read(stream, url, max_sample_bytes, links)


class _TrackedInfo(tarfile.TarInfo):
    """tarfile's own header reader, keeping the last header block so the end of the stream can be
    told apart: an end-of-archive marker (zeros), nothing (cut between members), or garbage."""

    @classmethod
    def fromtarfile(cls, archive):
        buf = archive.fileobj.read(tarfile.BLOCKSIZE)
        archive.attncache_last_header = buf
        obj = cls.frombuf(buf, archive.encoding, archive.errors)
        obj.offset = archive.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(archive)


class _Links:
    """Reads a hard link's target bytes from a second, forward-only pass over the same shard
    (reopened only when a target lies behind the previous one)."""

    def __init__(self, url: str):
        self.url, self.raw, self.archive = url, None, None

    def read(self, offset: int, size: int) -> bytes:
        if self.archive is None or self.archive.fileobj.tell() > offset:
            self.close()
            self.raw = open_url(self.url)
            self.archive = tarfile.open(fileobj=self.raw, mode="r|*")
        self.archive.fileobj.seek(offset)
        data = self.archive.fileobj.read(size)
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        self.raw = self.archive = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shown(name: str) -> tuple[str, bool]:
    """The name as text that can be printed and stored, and whether the tar's bytes were UTF-8."""
    if any("\udc80" <= c <= "\udcff" for c in name):
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), False
    return name, True


def _unsafe(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _problem(info: tarfile.TarInfo, name: str, utf8: bool, has_ext: bool) -> str | None:
    """Why this member cannot be part of a usable sample, or None."""
    if _unsafe(name):
        return f"unsafe member path {name!r}"
    if info.type in _TYPE_NAMES:
        link = f" -> {info.linkname!r}" if info.issym() else ""
        return f"{_TYPE_NAMES[info.type]}: {name!r}{link}"
    if info.issparse():
        return f"sparse file member (not supported): {name!r}"
    if not (info.isreg() or info.islnk()):
        return f"unsupported tar member type {info.type!r}: {name!r}"
    if not utf8:
        return f"member name is not valid UTF-8: {name!r}"
    if not has_ext:
        return f"member name without an extension: {name!r} (webdataset names are KEY.EXT)"
    return None


@dataclass(frozen=True)
class _Member:
    """One tar member on its way through the grouping: its bytes when read, else None (with the
    reason when this member is the cause; members after a sample's first problem carry none)."""

    ordinal: int
    name: str
    ext: str
    data: bytes | None = None
    problem: str | None = None


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits them; a name without an extension is its own key."""
    key, ext = base_plus_ext(name)
    return (name, "") if key is None else (key, ext)


def _grouping_key(name: str) -> tuple[str, str]:
    key, ext = split_name(name)
    return key, "." + ext  # never equal to group_by_keys' own __key__ / __url__ / __bad__ entries


class _Recorder:
    """group_by_keys' handler. The only member it refuses is one whose extension repeats within
    the sample: that member is kept here (the reader has already recorded why) and joins its
    sample's entry, so it is counted. Anything else is a bug and raises (a handler that returns
    False would end the shard silently)."""

    def __init__(self):
        self.last: _Member | None = None  # the member group_by_keys is handling (set by the reader)
        self.pending: list[_Member] = []

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, ValueError) and "duplicate file name" in str(exn) and self.last is not None:
            self.pending.append(self.last)
            return True
        raise exn

    def take(self) -> list[_Member]:
        taken, self.pending = self.pending, []
        return taken


@dataclass
class _Budget:
    """What the reader must know of the sample being read before it reads a member: the bytes and
    extensions already taken (size limit, duplicates) and whether the sample already failed."""

    key: str | None = None
    size: int = 0
    exts: set = field(default_factory=set)
    failed: bool = False


class _Emitter:
    """Numbers samples in tar order and marks repeated keys."""

    def __init__(self):
        self.seen: dict[str, int] = {}
        self.position = 0

    def __call__(self, key: str, members: list[_Member], error: str | None = None) -> ShardEntry:
        error = error or next((m.problem for m in members if m.problem), None)
        if error is None and key in self.seen:
            error = f"duplicate key in shard (first at position {self.seen[key]})"
        self.seen.setdefault(key, self.position)
        entry = ShardEntry(self.position, key, {m.ext: m.data for m in members if m.data is not None}, error,
                           tuple(m.name for m in members))
        self.position += 1
        return entry


def _read(stream: tarfile.TarFile, url: str, limit: int, links: _Links) -> Iterator[ShardEntry]:
    recorder, end = _Recorder(), []
    samples = group_by_keys(_members(stream, url, limit, links, recorder, end), keys=_grouping_key, lcase=True,
                            handler=recorder)
    emit, last = _Emitter(), None
    for sample in samples:  # one sample behind: a bad end belongs to the last sample
        members = [v for k, v in sample.items() if k.startswith(".")] + recorder.take()
        if last is not None:
            yield emit(*last)
        last = (sample["__key__"], sorted(members, key=lambda m: m.ordinal))
    if end and end[0][0] == "current":
        key, members = last or (f"<unknown after position {emit.position}>", [])
        last = (key, members, end[0][1])
    if last is not None:
        yield emit(*last)
    if end and end[0][0] == "extra":
        yield emit("<after the end-of-archive marker>", [], end[0][1])


def _members(stream, url: str, limit: int, links: _Links, recorder: _Recorder, end: list) -> Iterator[dict]:
    """Every member as webdataset's file records ({fname, data, __url__}, `data` a _Member), read
    only when it can be used; how the tar ended goes into `end` (None, or (where, reason))."""
    budget, regular = _Budget(), {}  # regular: member name -> (data offset, size), for hard links
    try:
        for ordinal, info in enumerate(stream):
            stream.members = []  # tarfile keeps every header otherwise
            name, utf8 = _shown(info.name)
            key, ext = split_name(name)
            if key != budget.key:
                budget = _Budget(key)
            if info.isreg() and not info.issparse():
                regular[info.name] = (info.offset_data, info.size)
            problem, data, failure = _problem(info, name, utf8, bool(ext)), None, None
            if problem is None and not budget.failed:
                try:
                    data, problem = _take(budget, stream, info, name, ext.lower(), limit, regular, links)
                except _READ_ERRORS as exc:
                    failure = exc
            budget.failed = budget.failed or problem is not None
            recorder.last = _Member(ordinal, name, ext.lower(), data, problem)
            yield {"fname": name, "data": recorder.last, "__url__": url}
            if failure is not None:
                raise failure
        end.append(_end_problem(stream))
    except _READ_ERRORS as exc:
        end.append(("current", f"tar truncated or corrupt ({exc}): the rest of the shard is unreadable"))
    if end[0] is None:
        end.clear()


def _take(budget: _Budget, stream, info, name: str, ext: str, limit: int, regular: dict,
          links: _Links) -> tuple[bytes | None, str | None]:
    """One member's bytes, or why its sample fails (reading nothing)."""
    if ext in budget.exts:
        return None, f"duplicate member {name!r}"
    source = regular.get(info.linkname) if info.islnk() else (info.offset_data, info.size)
    if source is None:
        return None, (f"hard link without a target: {name!r} -> {info.linkname!r} is not a regular member "
                      f"earlier in the shard")
    if budget.size + source[1] > limit:
        return None, (f"sample exceeds --max-sample-bytes {limit:,}: {budget.size + source[1]:,} bytes with "
                      f"member {name!r} (not read)")
    if info.islnk():
        try:
            data = links.read(*source)
        except _READ_ERRORS as exc:
            return None, f"hard link {name!r} -> {info.linkname!r}: target unreadable ({exc})"
        regular[info.name] = source
    else:
        data = stream.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError("unexpected end of data")
    budget.exts.add(ext)
    budget.size += len(data)
    return data, None


def _end_problem(stream: tarfile.TarFile) -> tuple[str, str] | None:
    """How the tar ended: None for an end-of-archive marker followed by zeros only; else whether
    the problem belongs to the last sample ("current") or is data beyond the archive ("extra")."""
    last = getattr(stream, "attncache_last_header", b"\0" * tarfile.BLOCKSIZE)
    if len(last) == 0:
        return "current", ("tar truncated: it ends without the end-of-archive marker (cut between members: "
                           "later samples may be missing)")
    if len(last) < tarfile.BLOCKSIZE:
        return "current", f"tar truncated: it ends inside the member header at byte {stream.offset:,}"
    if last.count(0) != tarfile.BLOCKSIZE:
        return "current", (f"tar corrupt: the member header at byte {stream.offset:,} is unreadable; "
                           f"the rest of the shard is not read")
    while chunk := stream.fileobj.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return "extra", ("data after the end-of-archive marker, not read (concatenated tars? "
                             "repack them into one tar)")
    return None
