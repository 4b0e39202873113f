"""Concurrent writers: one precompute writes a store at a time (`pipeline/store/lease.py`); a second is
refused naming the holder, a dead or frozen holder's lease is taken over, and the store always ends
byte-identical to a single uninterrupted run."""
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from attncache.pipeline.store.lease import Lease, LeaseConfig, StoreBusy
from relhelp import FAST, TEACHER_ARGS, cli_args, differing, env, invoke, noise_shards, store_files

LEASE_HOLDER = re.compile(r"is being written by another precompute \(pid \d+ on host \S+, started")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    data = noise_shards(root / "d", 96, shard_size=8, seed=11)
    args = ["precompute", "--data", data, *TEACHER_ARGS, "--views", "2", *FAST, "--ray", "none"]
    ref = invoke(*args, "--out", root / "ref.zarr")
    assert ref.exit_code == 0, ref.output
    return root, args, store_files(root / "ref.zarr")


def _processed(stdout: str) -> int:
    return int(re.search(r"units: (\d+) processed", stdout).group(1))


def test_two_precomputes_started_at_once_write_each_unit_once_and_match_a_single_run(job, tmp_path):
    root, args, ref = job
    out = tmp_path / "both.zarr"
    procs = [subprocess.Popen(cli_args(*args, "--out", out), env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert winners, results
    for _, _, stderr in refused:  # the loser says who holds the store, in one line
        assert "StoreBusy" in stderr and LEASE_HOLDER.search(stderr), stderr
        assert "Traceback" not in stderr
    # either the second was refused, or it started after the first finished and found nothing to do
    assert sum(_processed(stdout) for _, stdout, _ in winners) == 24, results
    assert differing(ref, store_files(out)) == []
    assert invoke("verify", out).exit_code == 0


def _lease(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    record = {"token": "other", "host": "other-host", "pid": 4242, "pid_start": "1", "acquired": time.time() - 5,
              "heartbeat": time.time(), "timeout_s": 60.0, **fields}
    (out / "precompute.lease").write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_lease_refuses_and_a_dead_or_stale_one_is_taken_over(tmp_path):
    data = noise_shards(tmp_path / "d", 8, shard_size=8, seed=1)
    args = ["precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none"]
    out = tmp_path / "s.zarr"
    _lease(out)  # a live holder on another machine
    busy = invoke(*args, "--out", out)
    assert busy.exit_code == 1 and "pid 4242 on host other-host" in busy.output, busy.output
    assert "lease expires after 60.0 s without a heartbeat (--lease-timeout)" in busy.output
    assert sorted(os.listdir(out)) == ["precompute.lease"]  # refused before creating anything
    cases = {"stale heartbeat": dict(heartbeat=time.time() - 61),
             "dead pid on this host": dict(host=socket.gethostname(), pid=_dead_pid()),
             "reused pid on this host": dict(host=socket.gethostname(), pid=os.getpid(), pid_start="0")}
    for what, fields in cases.items():
        _lease(out, **fields)
        (out / "units/0/000000.json").unlink(missing_ok=True)
        result = invoke(*args, "--out", out)
        assert result.exit_code == 0, (what, result.output)
        assert "took over the lease of a dead or stalled precompute (pid" in result.output, what
        assert "1 processed" in result.output and not (out / "precompute.lease").exists(), what
    (out / "precompute.lease").write_text('{"token": "tor')  # being written, or its writer was killed
    assert invoke(*args, "--out", out).exit_code == 1  # binding while it may still be being written
    os.utime(out / "precompute.lease", (time.time() - 6, time.time() - 6))
    taken = invoke(*args, "--out", out)
    assert taken.exit_code == 0 and "took over the lease" in taken.output, taken.output


def test_a_frozen_holder_is_taken_over_after_the_timeout_and_then_stops(job, tmp_path):
    root, args, ref = job
    out = tmp_path / "frozen.zarr"
    first = subprocess.Popen(cli_args(*args, "--out", out, "--lease-timeout", "2"), env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("units/*/*.json"))) < 2 and first.poll() is None:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        done_at_stop = len(list(out.glob("units/*/*.json")))
        assert 2 <= done_at_stop < 24, "the freeze must land part-way through the job"
        with pytest.raises(StoreBusy, match="is being written by another precompute"):
            Lease(str(out), LeaseConfig(2.0)).acquire()  # frozen but not yet stale
        time.sleep(2.5)
        second = invoke(*args, "--out", out, "--lease-timeout", "2")
        assert second.exit_code == 0, second.output
        assert "took over the lease of a dead or stalled precompute" in second.output
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    code, (stdout, stderr) = first.wait(timeout=120), first.communicate()
    # woken up, the first job finds its lease gone and stops (or it was writing its last unit,
    # which it finishes with the same bytes); either way nothing is corrupted
    assert code == 0 or ("LeaseLost" in stderr and "lease was taken over" in stderr), (code, stdout, stderr)
    assert differing(ref, store_files(out)) == []
    assert invoke("verify", out).exit_code == 0
