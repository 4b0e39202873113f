"""What a command that writes an --out directory owes the user when it fails: no empty --out
folder left behind (the store's lease creates it before the store's checks run), and an OSError
that names no file (zarr's writes on a full disk raise a bare ENOSPC) named after --out. A folder
that holds anything (a finished unit, a checkpoint) is kept, so a store or run stopped by a full
disk stays resumable."""
from __future__ import annotations

import os
from contextlib import contextmanager

from attncache.pipeline._util.files import is_local


@contextmanager
def writing_to(path):
    text = str(path)
    new = is_local(text) and not os.path.lexists(text)
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = text
        if new and os.path.isdir(text):
            try:
                os.rmdir(text)  # only succeeds on an empty directory
            except OSError:
                pass
        raise
