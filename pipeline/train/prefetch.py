"""The next unit's store objects fetched on a background thread while the current unit is consumed.

On an object store a unit's read is a dozen requests in a row (its marker, one GET per shard file:
pipeline/store/unit_read.py); fetched in the step before it is needed, their latency overlaps with
decoding the tar and training on the current unit instead of stalling a step. One unit ahead at
most, so memory grows by one unit's encoded bytes. Only the fetching runs on the thread: checking
the bytes against the marker and decoding them happen when the unit is consumed, and an error met
while fetching is raised then, as it was, so messages and the point of failure are those of a read
without prefetch. The thread is a daemon joined by `close` (end of an epoch, an error, Ctrl-C), and
a loader worker process that is shut down takes it with it.
"""
from __future__ import annotations

import threading
from typing import Callable

THREAD_NAME = "attncache-prefetch"


class _Fetch(threading.Thread):
    def __init__(self, key: int, fetch: Callable[[int], object]):
        super().__init__(name=THREAD_NAME, daemon=True)
        self.key, self._fetch = key, fetch
        self.result: object = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self._fetch(self.key)
        except Exception as exc:  # carried to the consumer, raised where the unit is used
            self.error = exc


class Prefetch:
    """`take(k)` gives what `fetch(k)` returns, fetched ahead when `ahead(k)` was called before."""

    def __init__(self, fetch: Callable[[int], object]):
        self._fetch = fetch
        self._pending: _Fetch | None = None

    def ahead(self, key: int) -> None:
        """Start fetching `key` now unless a fetch is already under way (one unit ahead at most)."""
        if self._pending is None:
            self._pending = _Fetch(key, self._fetch)
            self._pending.start()

    def take(self, key: int):
        """`fetch(key)`'s result: the one fetched ahead (waiting for it to finish), else fetched now.
        A fetch ahead of another key (the guess was wrong) is joined and dropped."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()
            if pending.key == key:
                if pending.error is not None:
                    raise pending.error
                return pending.result
        return self._fetch(key)

    def close(self) -> None:
        """Join a fetch still under way and drop it (at most one unit's requests to wait for)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()
