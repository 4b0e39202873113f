"""The crash tests' kill points: a process that passes a named point of a write path can SIGKILL itself there.

The store's write path (store/cache.py) and a run directory's commits (_util/atomic.py, train/checkpoint.py)
pass named points; nothing happens unless `ATTNCACHE_FAULT` is set.
"""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

FAULT_ENV = "ATTNCACHE_FAULT"
_fault_hits: Counter = Counter()


def fault_point(name: str, torn_file: str | None = None) -> None:
    """Test hook for the crash tests: `ATTNCACHE_FAULT=POINT:N` SIGKILLs this process the N-th time
    it passes POINT; `POINT:N:torn` first leaves what a kill in the middle of writing `torn_file`
    would (half of it as zarr's `.partial` temp file, and the file itself cut to half, as on a file
    system without atomic rename). Points: store-create, unit-start, array-written, data-written,
    marker-tmp, unit-done. Unset (always, outside tests), it costs one dict lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, nth, *mode = spec.split(":")
    if point != name:
        return
    _fault_hits[name] += 1
    if _fault_hits[name] != int(nth):
        return
    if mode == ["torn"] and torn_file is not None and os.path.isfile(torn_file):
        data = Path(torn_file).read_bytes()
        Path(f"{torn_file}.{'0' * 32}.partial").write_bytes(data[:len(data) // 2])
        Path(torn_file).write_bytes(data[:len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
