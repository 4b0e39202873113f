"""One line for an OSError of a file operation (a full disk, a read-only store, a path that is a
file): the path, what happened and what to do. cli/main.py shows these and the user-error classes
as one line; everything else keeps its traceback, so a genuine bug is never hidden."""
from __future__ import annotations

import errno

from attncache.pipeline.data.errors import redact  # stdlib only (data.shards would load torch)

_ADVICE = {
    errno.ENOSPC: "no space left on device: free space (or choose another path) and re-run the same command; "
                  "a store resumes from its finished units",
    errno.EDQUOT: "disk quota exceeded: free space (or choose another path) and re-run the same command",
    errno.EROFS: "read-only file system: choose a writable path",
    errno.EACCES: "permission denied: choose a path you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you can write, or fix its permissions",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path",
    errno.EISDIR: "is a directory where a file was expected: choose another path",
    errno.EEXIST: "exists already and is not what was expected here: choose another path",
    errno.ENOENT: "no such file or directory",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --workers",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
}


def os_error_line(exc: OSError) -> str:
    """`PATH: what happened (ENAME): what to do`, from an OSError raised by a file operation."""
    code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    where = redact(str(exc.filename)) if exc.filename is not None else "attncache"
    if exc.filename2 is not None:
        where += f" -> {redact(str(exc.filename2))}"
    advice = _ADVICE.get(exc.errno, exc.strerror or str(exc))
    return f"{where}: {advice} ({type(exc).__name__} {code})"
