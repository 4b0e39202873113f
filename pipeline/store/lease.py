"""One precompute writer per store: a lease file with a heartbeat, and a stale-lease timeout.

Two precompute jobs on one store would not corrupt a unit (a unit's bytes are deterministic and
every file is written whole), but they would do the work twice and race on markers, so the second
job is refused with a message naming the holder. The lease is `STORE/precompute.lease`, JSON with
the holder's host, pid, process start time, a random token and a heartbeat time that a daemon
thread refreshes every `timeout_s / 4` seconds. A holder that dies leaves the file behind; the lease
counts as free when

- its holder ran on this host and that process is gone (pid absent or started at another time):
  a SIGKILLed job is resumed at once, or
- its heartbeat is older than the holder's `timeout_s` (a holder on another machine, or frozen).

Taking over a free lease goes through a short-lived `precompute.lease.takeover` file created with
O_EXCL, so two jobs cannot both take over the same stale lease. A holder whose lease was taken over
(it froze past its timeout) notices at its next heartbeat or check and stops with `LeaseLost`.

On object stores (fsspec URLs) the lease and the takeover file are created with a create-only put
(S3 `If-None-Match: *`, which AWS, MinIO and moto honour), so two writers are refused as on a
local disk. A backend that ignores it is found by a probe at start-up (`Files.exclusive_create`)
and said so in one line on stderr: there the lease is written, read back and its token compared,
which closes all but a small race window. Ray jobs hold the lease in the driver only, since
workers never decide which units to run.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from attncache.pipeline._util.files import Files
from attncache.pipeline.data.shards import redact
from attncache.pipeline.store.meta import StoreError

LEASE_FILE = "precompute.lease"
DEFAULT_LEASE_TIMEOUT_S = 120.0
TORN_LEASE_GRACE_S = 5.0


class StoreBusy(StoreError):
    """Another live precompute holds the store's lease."""


class LeaseLost(StoreError):
    """This job's lease was taken over (it stalled past its timeout): stop before writing more."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def holder_alive(record: dict, now: float) -> bool:
    """Whether the lease in `record` still binds others: a pure function of the record, the host's
    process table and the clock."""
    if record.get("host") == socket.gethostname() and Path("/proc").is_dir():
        start = _process_start(int(record.get("pid", -1)))
        if start is None or start != record.get("pid_start"):
            return False
    return now - float(record.get("heartbeat", 0)) <= float(record.get("timeout_s", DEFAULT_LEASE_TIMEOUT_S))


def describe(record: dict, now: float) -> str:
    return (f"pid {record.get('pid')} on host {record.get('host')}, started {now - record.get('acquired', now):.0f} s "
            f"ago, last heartbeat {now - record.get('heartbeat', now):.1f} s ago, "
            f"stale after {record.get('timeout_s')} s")


@dataclass(frozen=True)
class LeaseConfig:
    """How long a silent holder keeps the store: long enough to ride out a slow object store or a
    busy machine (a heartbeat every timeout/4), short enough that a lost machine frees it soon."""

    timeout_s: float = DEFAULT_LEASE_TIMEOUT_S


class Lease:
    """The held lease of one store; `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, root: str, config: LeaseConfig = LeaseConfig()):
        self.root, self.config = str(root), config
        self.files = Files(self.root)
        self.files.ensure_root()
        self.token = uuid.uuid4().hex
        self.took_over: str | None = None  # the stale holder this lease replaced, for the log
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, acquired: float) -> bytes:
        pid = os.getpid()
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": pid,
                           "pid_start": _process_start(pid), "acquired": acquired, "heartbeat": time.time(),
                           "timeout_s": self.config.timeout_s, "command": "attncache precompute"}).encode()

    def _current(self) -> dict | None:
        raw = self.files.read(LEASE_FILE)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            # being written by a holder that has just created it, or left by one killed while
            # writing it: binding for a few seconds after its last change, then stale
            age = self.files.age(LEASE_FILE) or 0.0
            return {"token": None, "host": "?", "pid": "?", "heartbeat": time.time() - age,
                    "timeout_s": TORN_LEASE_GRACE_S}

    def acquire(self) -> "Lease":
        self._acquired = time.time()
        if not self.files.exclusive_create():
            print(f"note: {redact(self.root)}: this object store ignores create-only writes (If-None-Match), so the "
                  "store's lease cannot be taken atomically: do not start two precomputes on it at once",
                  file=sys.stderr)
        if not self.files.create(LEASE_FILE, self._record(self._acquired)):
            self._take_over()
        self.files.remove_temps(LEASE_FILE, ".tmp-*")  # heartbeat temp files of a holder killed mid-write
        self._thread = threading.Thread(target=self._beat, name="attncache-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self) -> None:
        mutex = LEASE_FILE + ".takeover"
        if not self.files.create(mutex, self.token.encode()):
            age = self.files.age(mutex)
            if age is None or age < 30:
                raise StoreBusy(f"{redact(self.root)}: another precompute is taking over this store's lease right now")
            self.files.delete(mutex)  # left by a job killed during a takeover
            if not self.files.create(mutex, self.token.encode()):
                raise StoreBusy(f"{redact(self.root)}: another precompute is taking over this store's lease right now")
        try:
            record, now = self._current(), time.time()
            if record is not None and holder_alive(record, now):
                raise StoreBusy(f"{redact(self.root)} is being written by another precompute "
                                f"({describe(record, now)}). "
                                "Wait for it to finish; if it is dead on another machine its lease expires after "
                                f"{record.get('timeout_s')} s without a heartbeat (--lease-timeout)")
            self.took_over = None if record is None else describe(record, now)
            self.files.write_atomic(LEASE_FILE, self._record(self._acquired))
        finally:
            self.files.delete(mutex)

    def _beat(self) -> None:
        interval = max(0.05, self.config.timeout_s / 4)
        while not self._stop.wait(interval):
            if not self._still_mine():
                return
            self.files.write_atomic(LEASE_FILE, self._record(self._acquired))

    def _still_mine(self) -> bool:
        record = self._current()
        if record is None or record.get("token") != self.token:
            self.lost = "none" if record is None else describe(record, time.time())
            return False
        return True

    def check(self) -> None:
        """Raise LeaseLost when another job holds the lease now: called before each unit's write."""
        if self.lost is not None or not self._still_mine():
            raise LeaseLost(f"{redact(self.root)}: this precompute's lease was taken over (new holder: {self.lost}); "
                            "it stalled longer than --lease-timeout. Stopping without writing more units")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self._still_mine():
            self.files.delete(LEASE_FILE)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
