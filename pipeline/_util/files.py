"""The one file layer: small files under a root that is a local folder or an fsspec URL.

Whether a path is local is decided here and nowhere else (`is_local`). A local root gets what a
POSIX file system offers (exclusive create, temp file + fsync + rename, listing, leftover temps of
killed writers); an fsspec root gets what an object store offers (a put is published whole or not
at all, so it needs no temp name; there is nothing to list half-made). Callers say what they want
done with a file, never which kind of root they hold.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from attncache.pipeline._util.atomic import TEMP_MARK, commit_temp


def is_local(path) -> bool:
    """A plain path (or `Path`), not a URL such as `s3://`, `gs://`, `memory://` or `file://`."""
    return "://" not in str(path)


def file_path(url) -> str | None:
    """The path on this machine that a plain path or a `file://` URL names; None for a remote URL
    (whose size or bytes cost a download, so callers that only want a cheap check skip it)."""
    url = str(url)
    if is_local(url):
        return url
    return url.removeprefix("file://") if url.startswith("file://") else None


class Files:
    """Files relative to `root`; every method takes a root-relative path `rel` ('/'-separated)."""

    def __init__(self, root):
        self.root = str(root)
        self.local = is_local(self.root)
        self._exclusive: bool | None = None  # whether the backend refuses a create-only put itself
        if not self.local:
            import fsspec

            self.fs, base = fsspec.core.url_to_fs(self.root)
            self.base = base.rstrip("/")

    def full(self, rel: str) -> str:
        return os.path.join(self.root, rel) if self.local else f"{self.base}/{rel}"

    def local_path(self, rel: str) -> Path | None:
        """The file's path on this machine, None under a URL."""
        return Path(self.full(rel)) if self.local else None

    def ensure_root(self) -> None:
        """Make the root folder (object stores have no folders: nothing to do)."""
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def is_file(self, rel: str) -> bool:
        return os.path.isfile(self.full(rel)) if self.local else bool(self.fs.exists(self.full(rel)))

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, None when it does not exist. Remotely one GET: asked as the range `0-`,
        since a plain whole-object read costs s3fs a HEAD first (for the size, to split big reads);
        an empty object refuses any range, so that error gets the plain read."""
        try:
            if self.local:
                return Path(self.full(rel)).read_bytes()
            try:
                return self.fs.cat_file(self.full(rel), start=0)
            except FileNotFoundError:
                raise
            except OSError:
                return self.fs.cat_file(self.full(rel))
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        """The whole file or the old one, never half: locally a temp file (named per process and
        thread, so a heartbeat thread and its job never share one), fsync, rename; remotely a put."""
        path = self.full(rel)
        if not self.local:  # object stores publish a put whole or not at all
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = Path(f"{path}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        commit_temp(tmp, Path(path))

    def write_replace(self, rel: str, data: bytes | list) -> None:
        """The whole file or the old one (or none), never half, without `write_atomic`'s fsyncs:
        for bulk data whose digest a later, durable file records (a store's shard files under their
        unit's marker), which is what zarr's own store did for them: a temp file renamed into place
        locally, a put remotely. A power cut can leave such a file short; its marker's size says so.
        `data` may be a list of buffers, the file being their concatenation: written one after the
        other locally (an 80 MB shard is then never copied into one buffer), joined for a put."""
        parts = data if isinstance(data, list) else [data]
        path = self.full(rel)
        if not self.local:
            self.fs.pipe_file(path, b"".join(parts))
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            os.replace(tmp, path)
        except BaseException:  # a part that cannot be written leaves no temp (a kill still can: cleared on rewrite)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def create(self, rel: str, data: bytes) -> bool:
        """Create the file unless it exists (False then). Locally O_EXCL; on an object store a
        create-only put (S3 `If-None-Match: *`), which the server refuses when the object exists.
        A backend that cannot (see `exclusive_create`) gets exists + put + read-back, which a
        rival's put in between shows, but two puts at the same instant can both pass."""
        path = self.full(rel)
        if not self.local:
            try:
                if self.exclusive_create():
                    self.fs.pipe_file(path, data, mode="create")
                elif self.fs.exists(path):
                    return False
                else:
                    self.fs.pipe_file(path, data)
            except FileExistsError:
                return False
            return self.read(rel) == data
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def exclusive_create(self) -> bool:
        """Whether `create` is refused by the backend itself when the file exists, probed once per
        root with a throw-away object created twice (3-4 requests): S3 servers that ignore
        `If-None-Match` (and fsspec backends without `mode="create"`) answer the second put with
        success. Local folders always are."""
        if self.local:
            return True
        if self._exclusive is None:
            self._exclusive = self._probe_exclusive()
        return self._exclusive

    def _probe_exclusive(self) -> bool:
        probe = f"{self.base}/.attncache-create-probe-{os.getpid()}-{threading.get_ident()}-{time.time_ns()}"
        try:
            self.fs.pipe_file(probe, b"1", mode="create")
            try:
                self.fs.pipe_file(probe, b"2", mode="create")
            except FileExistsError:
                return True
            return False
        except (TypeError, NotImplementedError, ValueError):
            return False
        finally:
            try:
                self.fs.rm_file(probe)
            except FileNotFoundError:
                pass

    def delete(self, rel: str) -> None:
        try:
            os.remove(self.full(rel)) if self.local else self.fs.rm_file(self.full(rel))
        except FileNotFoundError:
            pass

    def remove_temps(self, rel: str, pattern: str) -> None:
        """Delete `<rel's name><pattern>` beside `rel` (glob): temps a killed local writer left
        between writing and renaming. Object stores never hold such temps."""
        if self.local:
            for stale in Path(self.full(rel)).parent.glob(Path(rel).name + pattern):
                stale.unlink(missing_ok=True)

    def size(self, rel: str) -> int | None:
        try:
            return os.path.getsize(self.full(rel)) if self.local else int(self.fs.size(self.full(rel)))
        except FileNotFoundError:
            return None

    def age(self, rel: str) -> float | None:
        """Seconds since the file last changed; None when it is missing or the backend keeps no time."""
        try:
            mtime = os.path.getmtime(self.full(rel)) if self.local else self.fs.modified(self.full(rel)).timestamp()
        except (FileNotFoundError, NotImplementedError, AttributeError):
            return None
        return time.time() - mtime

    def total_bytes(self) -> int:
        if self.local:
            return sum(p.stat().st_size for p in Path(self.root).rglob("*") if p.is_file())
        return int(self.fs.du(self.base))

    def local_files(self) -> list[str]:
        """Every file under a local root, relative and sorted; [] for a URL or a missing folder
        (object stores are never listed for half-made states)."""
        root = Path(self.root)
        if not self.local or not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
