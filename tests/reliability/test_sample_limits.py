"""One bad sample must neither stop nor starve the job: labels that are not class indices, samples
above --max-sample-bytes (recorded and skipped without being read: peak memory measured in a fresh
process), and shards that end badly (cut mid-member, cut between members, a corrupt header, data
after the end marker, a truncated gzip, an empty tar, a file that is not a tar). Each is recorded
with shard, key and reason, counted, and shown as one line."""
import gzip
import io
import json
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from attncache.pipeline.data.shards import DataError, build_manifest, iter_shard
from attncache.pipeline.store.cache import CacheStore
from relhelp import FAST, ROOT, TEACHER_ARGS, env, invoke, png, write_tar

IMG = png(Image.new("RGB", (32, 32), (90, 10, 200)))
GIB = 2**30


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced as read (so writing the test shard needs no GiB of memory)."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.left)
        buf[:n] = b"\0" * n
        self.left -= n
        return n


@pytest.fixture(scope="module")
def gib_shard(tmp_path_factory):
    """A gzip tar of about 1 MB holding good, a 1 GiB zero member, good."""
    path = tmp_path_factory.mktemp("gib") / "gib-000000.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in (("a.png", IMG), ("a.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("huge.png")
        info.size = GIB
        tar.addfile(info, io.BufferedReader(_Zeros(GIB), 1 << 20))
        for name, data in (("huge.cls", b"1"), ("b.png", IMG), ("b.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 8 * 2**20
    return str(path)


@pytest.mark.slow
def test_a_1gib_member_is_recorded_without_raising_peak_memory(gib_shard):
    script = (
        "import json, resource, sys\n"
        "from attncache.pipeline.data.shards import iter_shard\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "entries = [(e.key, e.error, len(e.names)) for e in iter_shard(sys.argv[1])]\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'entries': entries, 'growth_kib': after - before}))\n")
    done = subprocess.run([sys.executable, "-c", script, gib_shard], env=env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["entries"] == [
        ["a", None, 2],
        ["huge", "sample exceeds --max-sample-bytes 67,108,864: 1,073,741,824 bytes with member 'huge.png' "
                 "(not read)", 2],
        ["b", None, 2]]
    assert got["growth_kib"] * 1024 < 64 * 2**20, got  # reading it would add at least 1 GiB


def _precompute(data, out, *extra):
    return invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", out, *extra)


def test_bad_labels_are_recorded_and_skipped_not_an_overflow(tmp_path):
    labels = {"ok": b"2", "big": str(10**30).encode(), "neg": b"-1", "float": b"1.0", "under": b"1_0",
              "arabic": "\u0663".encode(), "text": b"x" * 100_000, "digits": b"9" * 5000, "max": b"2147483647",
              "space": b" 3\n", "bom": "\ufeff1".encode()}
    path = write_tar(tmp_path / "lab-000000.tar", [m for key, label in labels.items()
                                                   for m in ((f"{key}.png", IMG), (f"{key}.cls", label))])
    result = _precompute(path, tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "OverflowError" not in result.output
    marker = CacheStore.open(tmp_path / "s.zarr").read_marker(0, 0)
    reasons = {s["key"]: s["reason"] for s in marker["skipped"]}
    rng = "(labels are class indices 0 to 2147483647)"
    assert reasons == {
        "big": f"label out of range: {10**30} {rng}",
        "neg": f"label is negative: -1 {rng}",
        "float": "label is not an integer: '1.0'",
        "under": "label is not an integer: '1_0'",
        "arabic": "label is not an integer: '\u0663'",
        "text": f"label is not an integer: '{'x' * 40}...'",
        "digits": f"label out of range: {'9' * 40}... {rng}"}
    data = CacheStore.open(tmp_path / "s.zarr").read_unit(0, 0)
    written = {str(k): int(lab) for k, lab, v in zip(data.keys, data.labels, data.valid) if v}
    assert written == {"ok": 2, "max": 2147483647, "space": 3, "bom": 1}
    assert marker["written"] + len(marker["skipped"]) == marker["count"] == len(labels)
    assert "samples written: 4   skipped: 7" in result.output


def test_size_limit_through_precompute_is_recorded_counted_and_one_line(tmp_path):
    path = write_tar(tmp_path / "sz-000000.tar", [("a.png", IMG), ("a.cls", b"1"),
                                                  ("big.png", IMG + b"\0" * 3_000_000), ("big.cls", b"1"),
                                                  ("many.png", IMG), ("many.cls", b"1"), ("many.json", b"\0" * 999_000),
                                                  ("many.txt", b"\0" * 2_000), ("c.png", IMG), ("c.cls", b"0")])
    result = _precompute(path, tmp_path / "s.zarr", "--max-sample-bytes", "1000000")
    assert result.exit_code == 0, result.output
    marker = CacheStore.open(tmp_path / "s.zarr").read_marker(0, 0)
    assert {s["key"]: s["reason"] for s in marker["skipped"]} == {
        "big": f"sample exceeds --max-sample-bytes 1,000,000: {len(IMG) + 3_000_000:,} bytes with member 'big.png' "
               f"(not read)",
        "many": f"sample exceeds --max-sample-bytes 1,000,000: {len(IMG) + 1 + 999_000 + 2_000:,} bytes with "
                f"member 'many.txt' (not read)"}
    assert "samples written: 2   skipped: 2" in result.output
    assert "  skipped (2): sample exceeds --max-sample-bytes 1,000,000" in result.output
    assert _precompute(path, tmp_path / "d.zarr").exit_code == 0  # the default limit takes them all
    assert CacheStore.open(tmp_path / "d.zarr").read_marker(0, 0)["skipped"] == []


def _whole(tmp_path, n=3):
    return write_tar(tmp_path / "whole.tar", [(f"t{i}.{ext}", data) for i in range(n)
                                              for ext, data in (("png", IMG), ("cls", b"1"))])


def _entries(path):
    return [(e.key, e.error) for e in iter_shard(str(path))]


def test_shards_that_end_badly_are_recorded_not_silently_short(tmp_path):
    whole = _whole(tmp_path)
    raw = open(whole, "rb").read()
    with tarfile.open(whole) as tar:
        members = {m.name: m for m in tar.getmembers()}
    end_of_data = members["t2.cls"].offset_data + 512  # the header after the last member: end marker
    cases = {
        "cut-between-members": raw[:members["t2.png"].offset],
        "cut-inside-header": raw[:members["t2.png"].offset + 100],
        "corrupt-header": raw[:members["t2.png"].offset] + b"\x7f" * 512 + raw[members["t2.png"].offset + 512:],
        "data-after-end": raw + raw,  # two tars concatenated: tar stops at the first end marker
        "no-padding": raw[:end_of_data + 512],
    }
    expected = {
        "cut-between-members": [("t0", None), ("t1", "tar truncated: it ends without the end-of-archive marker (cut "
                                                     "between members: later samples may be missing)")],
        "cut-inside-header": [("t0", None), ("t1", f"tar truncated: it ends inside the member header at byte "
                                                   f"{members['t2.png'].offset:,}")],
        "corrupt-header": [("t0", None), ("t1", f"tar corrupt: the member header at byte {members['t2.png'].offset:,} "
                                                f"is unreadable; the rest of the shard is not read")],
        "data-after-end": [("t0", None), ("t1", None), ("t2", None),
                           ("<after the end-of-archive marker>", "data after the end-of-archive marker, not read "
                                                                 "(concatenated tars? repack them into one tar)")],
        "no-padding": [("t0", None), ("t1", None), ("t2", None)],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        assert _entries(path) == expected[name], name
        assert build_manifest([str(path)]).shards[0].count == len(expected[name])
    gz = tmp_path / "gz.tar.gz"
    gz.write_bytes(gzip.compress(raw)[:-200])  # a download cut short
    got = _entries(gz)
    assert got and all(error is None for _, error in got[:-1]), got
    assert got[-1][1].startswith("tar truncated or corrupt ("), got
    assert build_manifest([str(gz)]).shards[0].count == len(got)


def test_empty_tar_counts_zero_and_non_tars_are_one_line_naming_the_file(tmp_path):
    empty = write_tar(tmp_path / "e-000000.tar", [])
    assert _entries(empty) == []
    result = _precompute(empty, tmp_path / "e.zarr")
    assert result.exit_code == 0 and "samples written: 0   skipped: 0" in result.output, result.output
    for name, data in (("zero-bytes", b""), ("html", b"<html>404 not found</html>" * 40),
                       ("gzip-of-text", gzip.compress(b"hello " * 1000))):
        path = tmp_path / f"{name}-000000.tar"
        path.write_bytes(data)
        with pytest.raises(DataError, match=rf"^{path}: not a readable tar file \("):
            list(iter_shard(str(path)))
        result = _precompute(str(path), tmp_path / f"{name}.zarr")
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip().splitlines() == [f"Error: DataError: {path}: not a readable tar file "
                                                      f"{result.output.split('tar file ', 1)[1].strip()}"]
        # refused before a store is made (the lease folder precompute takes first is not a store)
        assert not (tmp_path / f"{name}.zarr" / "zarr.json").exists()
