"""Every member a tar shard holds is either used or recorded with shard, key and reason (invariant 5):
hard links (how GNU tar stores a file it meets twice), symbolic links, directories, devices, FIFOs,
unknown types, names starting with `__`, names without an extension, names that are not UTF-8,
unsafe paths and oversized samples. Counted three ways: entries' member names against the tar's own
member list, the precompute summary, and each unit's marker."""
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attncache.pipeline.data.shards import BadSample, build_manifest, decode_sample, iter_shard
from attncache.pipeline.store.cache import CacheStore
from relhelp import FAST, TEACHER_ARGS, invoke, png

PIXELS = {name: png(Image.new("RGB", (32, 32), colour)) for name, colour in
          (("good", (200, 30, 30)), ("other", (10, 200, 30)), ("big", (1, 2, 3)))}
LIMIT = 4096
BIG = PIXELS["big"] + b"\0" * (5000 - len(PIXELS["big"]))  # a PNG with trailing bytes: 5,000 bytes, still decodable


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, 0
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.CONTTYPE, b"Z") else 0
    tar.addfile(info, io.BytesIO(data) if info.size else None)


# (tar members in order, expected outcome per key: "used" or the exact recorded reason)
MEMBERS = [
    ("train", None, tarfile.DIRTYPE, ""),
    ("__a.png", PIXELS["good"], tarfile.REGTYPE, ""), ("__a.cls", b"1", tarfile.REGTYPE, ""),
    ("__MACOSX/x.png", PIXELS["other"], tarfile.REGTYPE, ""), ("__MACOSX/x.cls", b"2", tarfile.REGTYPE, ""),
    ("good.png", PIXELS["good"], tarfile.REGTYPE, ""), ("good.cls", b"0", tarfile.REGTYPE, ""),
    ("link.png", None, tarfile.LNKTYPE, "good.png"), ("link.cls", b"3", tarfile.REGTYPE, ""),
    ("dangling.png", None, tarfile.LNKTYPE, "nowhere.png"), ("dangling.cls", b"1", tarfile.REGTYPE, ""),
    ("sym.png", None, tarfile.SYMTYPE, "/etc/passwd"), ("sym.cls", b"1", tarfile.REGTYPE, ""),
    ("dev", None, tarfile.CHRTYPE, ""),
    ("fifo.png", None, tarfile.FIFOTYPE, ""),
    ("odd.png", PIXELS["good"], b"Z", ""),
    ("README", b"hello", tarfile.REGTYPE, ""),
    ("cont.png", PIXELS["other"], tarfile.CONTTYPE, ""), ("cont.cls", b"0", tarfile.REGTYPE, ""),
    ("\u00f1and\u00fa.png", PIXELS["other"], tarfile.REGTYPE, ""), ("\u00f1and\u00fa.cls", b"2", tarfile.REGTYPE, ""),
    ("caf\udce9.png", PIXELS["good"], tarfile.REGTYPE, ""), ("caf\udce9.cls", b"1", tarfile.REGTYPE, ""),
    ("../up.png", PIXELS["good"], tarfile.REGTYPE, ""), ("../up.cls", b"1", tarfile.REGTYPE, ""),
    ("big.png", BIG, tarfile.REGTYPE, ""), ("big.cls", b"1", tarfile.REGTYPE, ""),
    ("twice.png", PIXELS["good"], tarfile.REGTYPE, ""), ("twice.cls", b"1", tarfile.REGTYPE, ""),
    ("twice.png", None, tarfile.LNKTYPE, "twice.png"),
    ("huge.png", PIXELS["good"], tarfile.REGTYPE, ""), ("huge.cls", b"1" + b"0" * 30, tarfile.REGTYPE, ""),
    ("neg.png", PIXELS["good"], tarfile.REGTYPE, ""), ("neg.cls", b"-3", tarfile.REGTYPE, ""),
    ("digits.png", PIXELS["good"], tarfile.REGTYPE, ""), ("digits.cls", "\u0663".encode(), tarfile.REGTYPE, ""),
]
EXPECTED = {
    "train": "directory member (holds no sample data): 'train'",
    "__a": "used", "__MACOSX/x": "used", "good": "used", "link": "used", "cont": "used", "\u00f1and\u00fa": "used",
    "dangling": "hard link without a target: 'dangling.png' -> 'nowhere.png' is not a regular member earlier "
                "in the shard",
    "sym": "symbolic link (not followed): 'sym.png' -> '/etc/passwd'",
    "dev": "character device member (not a regular file): 'dev'",
    "fifo": "FIFO member (not a regular file): 'fifo.png'",
    "odd": "unsupported tar member type b'Z': 'odd.png'",
    "README": "member name without an extension: 'README' (webdataset names are KEY.EXT)",
    "caf\\xe9": "member name is not valid UTF-8: 'caf\\\\xe9.png'",
    "../up": "unsafe member path '../up.png'",
    "big": "sample exceeds --max-sample-bytes 4,096: 5,000 bytes with member 'big.png' (not read)",
    "twice": "duplicate member 'twice.png'",
    "huge": "label out of range: 1000000000000000000000000000000 (labels are class indices 0 to 2147483647)",
    "neg": "label is negative: -3 (labels are class indices 0 to 2147483647)",
    "digits": "label is not an integer: '\u0663'",
}


@pytest.fixture
def odd_tar(tmp_path):
    path = tmp_path / "data" / "odd-000000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data, kind, link in MEMBERS:
            _add(tar, name, data or b"", kind, link)
    (path.parent / "classes.json").write_text('["a", "b", "c", "d"]')
    return str(path)


def _outcomes(url, limit=LIMIT):
    out = {}
    for entry in iter_shard(url, max_sample_bytes=limit):
        try:
            decode_sample(url, entry)
            out[entry.key] = "used"
        except BadSample as bad:
            assert bad.key == entry.key and bad.url == url
            out[entry.key] = bad.reason
    return out


def test_every_member_is_used_or_recorded_with_its_exact_reason(odd_tar):
    assert _outcomes(odd_tar) == EXPECTED
    entries = list(iter_shard(odd_tar, max_sample_bytes=LIMIT))
    with tarfile.open(odd_tar, encoding="utf-8", errors="surrogateescape") as tar:
        in_tar = len(tar.getmembers())
    assert in_tar == len(MEMBERS)
    assert sum(len(e.names) for e in entries) == in_tar  # members in tar == used + recorded
    assert [e.position for e in entries] == list(range(len(entries)))


def test_hard_link_reads_its_targets_bytes_and_image(odd_tar):
    entries = {e.key: e for e in iter_shard(odd_tar, max_sample_bytes=LIMIT)}
    assert entries["link"].members["png"] == PIXELS["good"] == entries["good"].members["png"]
    image, label = decode_sample(odd_tar, entries["link"])
    assert label == 3 and np.asarray(image)[0, 0].tolist() == [200, 30, 30]


def test_precompute_counts_every_member_in_summary_and_marker(odd_tar, tmp_path):
    result = invoke("precompute", "--data", odd_tar, *TEACHER_ARGS, *FAST, "--ray", "none", "--out",
                    tmp_path / "s.zarr", "--max-sample-bytes", LIMIT)
    assert result.exit_code == 0, result.output
    used = sorted(k for k, v in EXPECTED.items() if v == "used")
    assert f"samples written: {len(used)}   skipped: {len(EXPECTED) - len(used)}" in result.output
    assert "Traceback" not in result.output
    marker = CacheStore.open(tmp_path / "s.zarr").read_marker(0, 0)
    assert marker["count"] == len(EXPECTED) and marker["written"] == len(used)
    assert {s["key"]: s["reason"] for s in marker["skipped"]} == {k: v for k, v in EXPECTED.items() if v != "used"}
    data = CacheStore.open(tmp_path / "s.zarr").read_unit(0, 0)
    assert sorted(str(k) for k, v in zip(data.keys, data.valid) if v) == used
    # every reason is one line in the summary, each printed key with its reason
    assert re.search(r"odd-000000\.tar: 'sym': symbolic link \(not followed\): 'sym\.png' -> '/etc/passwd'$",
                     result.output, re.M), result.output
    assert invoke("verify", tmp_path / "s.zarr").exit_code == 0


def test_default_limit_lets_the_5000_byte_sample_through(odd_tar):
    assert _outcomes(odd_tar, limit=64 * 2**20)["big"] == "used"


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_hard_links_and_hard_dereference_give_the_same_samples(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(PIXELS["good"])
    os.link(src / "a.png", src / "b.png")  # one file, two names: GNU tar stores the second as a link
    (src / "a.cls").write_bytes(b"1")
    (src / "b.cls").write_bytes(b"2")
    names = ["a.png", "a.cls", "b.png", "b.cls"]
    linked, deref = tmp_path / "linked.tar", tmp_path / "deref.tar"
    subprocess.run(["tar", "cf", linked, "-C", src, *names], check=True)
    subprocess.run(["tar", "cf", deref, "--hard-dereference", "-C", src, *names], check=True)
    with tarfile.open(linked) as tar:
        assert tar.getmember("b.png").islnk()  # the case this test is about
    got = {}
    for path in (linked, deref):
        got[path] = [(e.key, e.error, decode_sample(str(path), e)[1], e.members["png"]) for e in iter_shard(str(path))]
    assert got[linked] == got[deref] == [("a", None, 1, PIXELS["good"]), ("b", None, 2, PIXELS["good"])]
    # the same file named twice on the command line: GNU tar writes a link to itself -> one sample, recorded
    twice = tmp_path / "twice.tar"
    subprocess.run(["tar", "cf", twice, "-C", src, "a.png", "a.cls", "a.png"], check=True)
    entries = list(iter_shard(str(twice)))
    assert [(e.key, e.error, len(e.names)) for e in entries] == [("a", "duplicate member 'a.png'", 3)]


def test_manifest_counts_every_entry_and_keeps_the_reasons(odd_tar):
    info = build_manifest([odd_tar], max_sample_bytes=LIMIT).shards[0]
    assert info.count == len(EXPECTED)
    assert "big: sample exceeds --max-sample-bytes 4,096: 5,000 bytes with member 'big.png' (not read)" in info.errors


def test_max_sample_bytes_is_range_checked_before_any_work(odd_tar, tmp_path):
    for value in ("0", "-5", "1023", str(2**41), "1e6", "x"):
        for command in (["precompute", "--data", odd_tar, *TEACHER_ARGS, *FAST, "--ray", "none",
                         "--out", tmp_path / f"r{value}.zarr"],
                        ["train", "--data", odd_tar, "--mode", "scratch", "--student", "vit_tiny_patch16_224",
                         "--out", tmp_path / f"run{value}", "--max-steps", "1"]):
            result = invoke(*command, "--max-sample-bytes", value)
            assert result.exit_code == 2, (command[0], value, result.output)
            assert "--max-sample-bytes" in result.output and "Traceback" not in result.output
            assert result.output.strip().splitlines()[-1].startswith("Error: Invalid value for '--max-sample-bytes'")
        assert not (tmp_path / f"r{value}.zarr").exists() and not (tmp_path / f"run{value}").exists()


def test_train_passes_max_sample_bytes_to_the_loader(odd_tar, tmp_path):
    """The option reaches its use: a sample the cache holds (read under the default limit) is over
    train's lower limit, so train stops naming it and the option instead of reading it."""
    good = str(Path(odd_tar).parent / "good-000000.tar")
    with tarfile.open(good, "w") as tar:
        for name, data in (("a.png", PIXELS["good"]), ("a.cls", b"0"), ("big.png", BIG), ("big.cls", b"1")):
            _add(tar, name, data)
    assert invoke("precompute", "--data", good, *TEACHER_ARGS, *FAST, "--ray", "none",
                  "--out", tmp_path / "s.zarr").exit_code == 0
    student = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
               "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3"]
    common = ["train", "--data", good, "--cache", tmp_path / "s.zarr", *student, "--mode", "distill",
              "--max-steps", "1", "--batch-size", "2", "--workers", "0", "--threads", "1", "--quiet"]
    low = invoke(*common, "--out", tmp_path / "low", "--max-sample-bytes", LIMIT)
    assert low.exit_code == 1 and "Traceback" not in low.output
    assert "'big': sample exceeds --max-sample-bytes 4,096: 5,000 bytes with member 'big.png' (not read)" in low.output
    assert invoke(*common, "--out", tmp_path / "default").exit_code == 0


def test_members_named_like_webdatasets_own_entries_stay_members_of_their_sample(tmp_path):
    """Grouping is webdataset's group_by_keys, whose samples also hold `__key__`, `__url__` and
    `__bad__`: a member `x.__bad__` must neither drop its sample nor collide with those entries."""
    path = tmp_path / "reserved.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("x.__bad__", b"1"), ("x.png", PIXELS["good"]), ("x.__key__", b"k"), ("x.__url__", b"u"),
                           ("x.cls", b"2"), ("y.png", PIXELS["other"]), ("y.cls", b"0")):
            _add(tar, name, data)
    entries = list(iter_shard(str(path)))
    assert [(e.key, e.error, len(e.names)) for e in entries] == [("x", None, 5), ("y", None, 2)]
    assert entries[0].members == {"__bad__": b"1", "png": PIXELS["good"], "__key__": b"k", "__url__": b"u", "cls": b"2"}
    assert [decode_sample(str(path), e)[1] for e in entries] == [2, 0]


def test_a_repeated_extension_after_a_recorded_member_is_counted_with_it(tmp_path):
    """group_by_keys refuses a repeated extension; the recording handler keeps that member with its
    sample (counted), and the sample's reason stays its first problem."""
    path = tmp_path / "rep.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "a.png", PIXELS["good"])
        _add(tar, "a.cls", b"1")
        _add(tar, "b.png", PIXELS["good"])
        _add(tar, "b.cls", b"1")
    entries = list(iter_shard(str(path)))
    assert [(e.key, e.error, e.names) for e in entries] == [
        ("a", "symbolic link (not followed): 'a.png' -> '/etc/passwd'", ("a.png", "a.png", "a.cls")),
        ("b", None, ("b.png", "b.cls"))]
