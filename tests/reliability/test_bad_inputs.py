"""Bad inputs through `attncache precompute` and `train`: each case with its expected outcome. Nothing
is lost silently: every sample is either written or recorded with shard, key and reason, and the
counts add up in the summary, the markers and `verify`."""
import json
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attncache.pipeline.store.cache import CacheStore
from relhelp import FAST, TEACHER_ARGS, invoke, png, write_tar

RGB = Image.new("RGB", (40, 30), (200, 30, 30))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims width x height: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# key -> (members, expected outcome: "written" or a fragment of the recorded reason), in tar order
SHARD_A = {
    "bomb": ([("bomb.png", header_only_png(20_000, 20_000)), ("bomb.cls", b"1")], "decompression"),
    "good0": ([("good0.png", png(RGB)), ("good0.cls", b"1")], "written"),
    "gray": ([("gray.png", png(Image.new("L", (32, 32), 128))), ("gray.cls", b"2")], "written"),
    "cmyk": ([("cmyk.jpg", png(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")), ("cmyk.cls", b"0")], "written"),
    "sixteen": ([("sixteen.png", png(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)))),
                 ("sixteen.cls", b"3")], "written"),
    "alpha": ([("alpha.png", png(Image.new("RGBA", (32, 32), (10, 20, 30, 0)))), ("alpha.cls", b"0")], "written"),
    "tiny": ([("tiny.png", png(Image.new("RGB", (1, 1), (7, 8, 9)))), ("tiny.cls", b"3")], "written"),
    "long": ([("long.png", png(Image.new("RGB", (20_000, 8), (1, 200, 3)))), ("long.cls", b"2")], "written"),
    "garbage": ([("garbage.jpg", b"this is not an image"), ("garbage.cls", b"1")], "undecodable"),
    "zero": ([("zero.png", b""), ("zero.cls", b"1")], "zero-byte"),
    "nolabel": ([("nolabel.png", png(RGB))], "no label"),
    "textlabel": ([("textlabel.png", png(RGB)), ("textlabel.cls", b"dog")], "not an integer"),
    "floatlabel": ([("floatlabel.png", png(RGB)), ("floatlabel.cls", b"1.5")], "not an integer"),
    "../evil": ([("../evil.png", png(RGB)), ("../evil.cls", b"0")], "unsafe member path"),
    "/abs/evil": ([("/abs/evil.png", png(RGB)), ("/abs/evil.cls", b"0")], "unsafe member path"),
    "good0#dup": ([("good0.png", png(RGB)), ("good0.cls", b"1")], "duplicate key in shard (first at position 1)"),
}


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_tar(d / "bad-000000.tar", [m for members, _ in SHARD_A.values() for m in members])
    whole = d / "whole.tar"
    write_tar(whole, [(f"t{i}.{ext}", data) for i in range(3) for ext, data in (("png", png(RGB)), ("cls", b"1"))])
    with tarfile.open(whole) as tar:
        last = tar.getmember("t2.png")
    (d / "bad-000001.tar").write_bytes(whole.read_bytes()[:last.offset_data + last.size // 2])  # cut mid-image
    whole.unlink()
    write_tar(d / "bad-000002.tar", [])  # an empty shard
    write_tar(d / "bad-000003.tar", [("good0.png", png(RGB)), ("good0.cls", b"1"),  # the same key as shard 0
                                     ("neg.png", png(RGB)), ("neg.cls", b"-3"),  # never a class: skipped
                                     ("seven.png", png(RGB)), ("seven.cls", b"7")])  # a class train lacks
    (d / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    return str(d / "bad-{000000..000003}.tar")


def _precompute(data, out, *extra):
    return invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", out, *extra)


def test_every_bad_input_is_converted_or_recorded_with_shard_key_and_reason(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _precompute(shards, tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    store = CacheStore.open(tmp_path / "s.zarr")
    markers = [store.read_marker(0, i) for i in range(4)]
    skipped = {(m["shard_url"].rsplit("-", 1)[1], s["key"]): s["reason"] for m in markers for s in m["skipped"]}
    written = {}
    for i in range(4):
        data = store.read_unit(0, i)
        written[i] = [str(k) for k, v in zip(data.keys, data.valid) if v]
    expected_skips = {k.split("#")[0]: outcome for k, (_, outcome) in SHARD_A.items() if outcome != "written"}
    got_skips = {key: reason for (shard, key), reason in skipped.items() if shard == "000000.tar"}
    assert set(got_skips) == set(expected_skips)
    for key, fragment in expected_skips.items():
        assert fragment in got_skips[key], (key, got_skips[key])
    assert written[0] == [k for k, (_, o) in SHARD_A.items() if o == "written"]
    assert written[1] == ["t0", "t1"] and "truncated" in skipped[("000001.tar", "t2")]
    assert markers[2]["count"] == 0 and written[2] == []  # empty shard: an empty unit, done
    assert written[3] == ["good0", "seven"]  # a key in two shards is cached in both; labels are checked by train
    assert skipped[("000003.tar", "neg")] == "label is negative: -3 (labels are class indices 0 to 2147483647)"
    for m in markers:
        assert m["written"] + len(m["skipped"]) == m["count"]
    assert "samples written: 11   skipped: 11" in result.output
    assert "warning: 1 keys appear in more than one shard (each copy is cached in its own unit): 'good0'" in result.output
    assert re.search(r"bad-000000\.tar: '\.\./evil': unsafe member path", result.output)
    # nothing was extracted anywhere, and no store path was built from a key
    assert not list(tmp_path.rglob("evil*")) and not Path("/abs/evil.png").exists()
    layout = re.compile(r"^((views(/0(/[a-z_]+)*)?/)?zarr\.json|views/0/[a-z/_]+/c(/\d+)+|units/0/\d{6}\.json)$")
    files = [str(p.relative_to(tmp_path / "s.zarr")) for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()]
    assert [f for f in files if not layout.match(f)] == []
    assert invoke("verify", tmp_path / "s.zarr").exit_code == 0


def test_fail_policy_and_skip_threshold_name_file_key_and_cause(shards, tmp_path):
    fail = _precompute(shards, tmp_path / "f.zarr", "--on-bad-sample", "fail")
    assert fail.exit_code == 1
    assert re.search(r"BadSample: \S+bad-000000\.tar: sample 'bomb': .*decompression", fail.output), fail.output
    assert "Traceback" not in fail.output
    capped = _precompute(shards, tmp_path / "c.zarr", "--max-skipped", "3")
    assert capped.exit_code == 1
    # the threshold is checked as each batch's skip records arrive, so the count may pass it by a batch's worth
    found = re.search(r"TooManySkipped: (\d+) samples skipped, more than --max-skipped 3; latest: \S+bad-000000\.tar: '",
                      capped.output)
    assert found and int(found.group(1)) > 3, capped.output
    assert _precompute(shards, tmp_path / "ok.zarr", "--max-skipped", "11").exit_code == 0  # exactly 11: allowed


def test_a_data_pattern_that_matches_nothing_is_one_clear_error(tmp_path):
    for pattern, message in ((tmp_path / "none-{000000..000003}.tar", "no such shard file(s)"),
                             (tmp_path / "missing.tar", "no such shard file(s)")):
        result = _precompute(str(pattern), tmp_path / "n.zarr")
        assert result.exit_code == 1 and "DataError" in result.output and message in result.output, result.output
    not_a_tar = tmp_path / "x-000000.tar"
    not_a_tar.write_bytes(b"\x00garbage" * 64)
    result = _precompute(str(not_a_tar), tmp_path / "x.zarr")
    assert result.exit_code == 1 and "x-000000.tar: not a readable tar file" in result.output


def test_labels_out_of_range_are_refused_by_train_naming_file_key_and_label(shards, tmp_path):
    assert _precompute(shards, tmp_path / "s.zarr").exit_code == 0
    result = invoke("train", "--data", shards, "--cache", tmp_path / "s.zarr", "--out", tmp_path / "run",
                    "--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
                    "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3",
                    "--max-steps", "50", "--batch-size", "4", "--workers", "0", "--threads", "1", "--quiet")
    assert result.exit_code == 1
    assert re.search(r"bad-000003\.tar: sample 'seven' has label 7 outside \[0, 4\)", result.output), result.output
