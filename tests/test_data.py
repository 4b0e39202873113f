"""Webdataset shards: packing, ordered reading, manifests, and every kind of bad input."""
import io
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attncache.cli.data_cmd import data
from attncache.pipeline.data.shards import (BadSample, DataError, build_manifest, decode_sample, expand_shards,
    iter_shard, pack_image_folder)
from attncache.pipeline.studies.synth import SynthConfig, synth_dataset


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _decode_one(path, key):
    entry = next(e for e in iter_shard(path) if e.key == key)
    return decode_sample(path, entry)


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 3), ("dog", 2), ("zebra", 2)):
        (src / cls).mkdir(parents=True)
        for i in range(count):
            arr = rng.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8)
            fmt = "PNG" if i % 2 == 0 else "JPEG"
            name = f"img {i}.v2.{'png' if fmt == 'PNG' else 'jpg'}"
            (src / cls / name).write_bytes(_encode(Image.fromarray(arr), fmt))
    (src / "cat" / "notes.txt").write_text("not an image")
    return src


def test_pack_then_read_gives_every_image_with_its_label_in_order(image_folder, tmp_path):
    # --no-shuffle: class-then-file order (the default shuffles; tests/reliability/test_pack.py)
    shards, ignored = pack_image_folder(image_folder, tmp_path / "out", shard_size=3, shuffle=False)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert ignored == [str(image_folder / "cat" / "notes.txt")]
    got = []
    for path in shards:
        for entry in iter_shard(str(path)):
            image, label = decode_sample(str(path), entry)
            got.append((entry.key, label, image))
    assert [g[0] for g in got] == ["0000_img_0_v2", "0000_img_1_v2", "0000_img_2_v2", "0001_img_0_v2",
                                   "0001_img_1_v2", "0002_img_0_v2", "0002_img_1_v2"]
    assert [g[1] for g in got] == [0, 0, 0, 1, 1, 2, 2]
    original = Image.open(image_folder / "cat" / "img 0.v2.png").convert("RGB")
    assert np.array_equal(np.asarray(got[0][2]), np.asarray(original))
    again, _ = pack_image_folder(image_folder, tmp_path / "out2", shard_size=3, shuffle=False)
    assert [a.read_bytes() for a in shards] == [b.read_bytes() for b in again]


def test_expand_shards_keeps_order_and_names_missing_files(tmp_path):
    for i in range(3):
        _tar(tmp_path / f"s-{i:02d}.tar", [(f"k{i}.cls", b"0")])
    assert expand_shards(str(tmp_path / "s-{00..02}.tar")) == [str(tmp_path / f"s-{i:02d}.tar") for i in range(3)]
    assert expand_shards([str(tmp_path / "s-02.tar"), str(tmp_path / "s-{00..02}.tar")])[0].endswith("s-02.tar")
    with pytest.raises(DataError, match="s-05.tar"):
        expand_shards(str(tmp_path / "s-{00..05}.tar"))
    with pytest.raises(DataError, match="matches no shards"):
        expand_shards([])


def test_manifest_counts_fingerprints_and_reports_cross_shard_duplicates(tmp_path):
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    a = _tar(tmp_path / "a.tar", [("x.png", png), ("x.cls", b"1"), ("y.png", png), ("y.cls", b"0")])
    b = _tar(tmp_path / "b.tar", [("y.png", png), ("y.cls", b"0"), ("z.png", png), ("z.cls", b"2")])
    m1, m2 = build_manifest([a, b]), build_manifest([a, b])
    assert [s.count for s in m1.shards] == [2, 2] and m1.total == 4 and m1.max_count == 2
    assert m1.fingerprint == m2.fingerprint
    assert m1.duplicate_keys_across_shards == ("y",)
    _tar(tmp_path / "b.tar", [("y.png", png), ("y.cls", b"0"), ("w.png", png), ("w.cls", b"2")])
    assert build_manifest([a, b]).fingerprint != m1.fingerprint


def test_truncated_tar_keeps_complete_samples_and_reports_the_broken_one(tmp_path):
    png = _encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG")
    whole = _tar(tmp_path / "w.tar", [(f"s{i}.png", png) for i in range(3)] + [("s2.cls", b"1")])
    with tarfile.open(whole) as tar:
        member = tar.getmember("s2.png")
    raw = open(whole, "rb").read()[: member.offset_data + 10]
    (tmp_path / "t.tar").write_bytes(raw)
    entries = list(iter_shard(str(tmp_path / "t.tar")))
    assert [e.key for e in entries] == ["s0", "s1", "s2"]
    assert entries[0].error is None and "truncated" in entries[2].error
    with pytest.raises(BadSample, match="s2.*truncated"):
        decode_sample(str(tmp_path / "t.tar"), entries[2])
    assert build_manifest([str(tmp_path / "t.tar")]).shards[0].count == 3


def test_not_a_tar_is_a_data_error_naming_the_file(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match="x.tar"):
        list(iter_shard(str(tmp_path / "x.tar")))


def test_bad_samples_raise_with_file_key_and_reason(tmp_path):
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    path = _tar(tmp_path / "bad.tar", [
        ("junk.jpg", b"not a jpeg"), ("junk.cls", b"1"),
        ("empty.png", b""), ("empty.cls", b"1"),
        ("nolabel.png", png),
        ("textlabel.png", png), ("textlabel.cls", b"dog"),
        ("noimage.cls", b"3"),
    ])
    expected = {"junk": "undecodable", "empty": "zero-byte", "nolabel": "no label",
                "textlabel": "not an integer", "noimage": "no image member"}
    for entry in iter_shard(path):
        with pytest.raises(BadSample) as info:
            decode_sample(path, entry)
        assert info.value.key == entry.key and info.value.url == path
        assert expected[entry.key] in info.value.reason, info.value.reason
        assert str(info.value).startswith(f"{path}: sample {entry.key!r}")


def test_structural_problems_become_entry_errors(tmp_path):
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    path = _tar(tmp_path / "s.tar", [("a.png", png), ("a.cls", b"0"), ("../evil.png", png), ("../evil.cls", b"0"),
                                      ("b.png", png), ("b.cls", b"0"), ("a.png", png), ("a.cls", b"1")])
    entries = list(iter_shard(path))
    assert [e.key for e in entries] == ["a", "../evil", "b", "a"]
    assert entries[0].error is None and "unsafe member path" in entries[1].error
    assert "duplicate key in shard (first at position 0)" in entries[3].error


def test_image_modes_are_converted_to_rgb_with_correct_values(tmp_path):
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    cases = {"gray": (Image.new("L", (4, 4), 128), "PNG", (128, 128, 128)),
             "sixteen": (sixteen, "PNG", (255, 255, 255)),
             "rgba": (rgba, "PNG", (10, 20, 30)),
             "palette": (palette, "PNG", (200, 100, 50)),
             "cmyk": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
             "tiny": (Image.new("RGB", (1, 1), (7, 8, 9)), "PNG", (7, 8, 9))}
    members = []
    for key, (img, fmt, _) in cases.items():
        members += [(f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", _encode(img, fmt)), (f"{key}.cls", b"0")]
    path = _tar(tmp_path / "modes.tar", members)
    for key, (_, fmt, rgb) in cases.items():
        image, _ = _decode_one(path, key)
        assert image.mode == "RGB"
        got = image.getpixel((0, 0))
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= (2 if fmt == "JPEG" else 0), (key, got)


def test_decompression_bomb_is_a_bad_sample_not_a_crash(tmp_path):
    bomb = Image.new("1", (20_000, 10_000))  # 200 Mpx at one bit per pixel: cheap to make
    path = _tar(tmp_path / "bomb.tar", [("big.png", _encode(bomb, "PNG")), ("big.cls", b"0")])
    with pytest.raises(BadSample, match="decompression"):
        _decode_one(path, "big")


def test_synth_is_reproducible_and_labelled(tmp_path):
    a = synth_dataset(tmp_path / "a", 40, 8, config=SynthConfig(image_size=32, num_classes=4), shard_size=16, seed=1)
    b = synth_dataset(tmp_path / "b", 40, 8, config=SynthConfig(image_size=32, num_classes=4), shard_size=16, seed=1)
    c = synth_dataset(tmp_path / "c", 40, 8, config=SynthConfig(image_size=32, num_classes=4), shard_size=16, seed=2)
    files = lambda d: [p.read_bytes() for p in sorted((tmp_path / d).glob("*.tar"))]
    assert files("a") == files("b") and files("a") != files("c")
    labels = [decode_sample(u, e)[1] for u in expand_shards(a["train"]) for e in iter_shard(u)]
    assert len(labels) == 40 and set(labels) == {0, 1, 2, 3}
    assert a["train"].endswith("train-{000000..000002}.tar")


def test_data_cli_synth_and_pack(tmp_path, image_folder):
    runner = CliRunner()
    result = runner.invoke(data, ["synth", str(tmp_path / "s"), "--num-train", "20", "--num-val", "4",
                                  "--shard-size", "10"])
    assert result.exit_code == 0, result.output
    assert "train-{000000..000001}.tar" in result.output and (tmp_path / "s" / "val-000000.tar").exists()
    result = runner.invoke(data, ["pack", str(image_folder), str(tmp_path / "p"), "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    assert "shard-{000000..000001}.tar" in result.output and "notes.txt" in result.output
    for cmd in (["synth", "--help"], ["pack", "--help"]):
        help_text = runner.invoke(data, cmd).output
        assert "default" in help_text


def test_fsspec_urls_read_like_local_paths(tmp_path):
    png = _encode(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG")
    path = _tar(tmp_path / "u.tar", [("a.png", png), ("a.cls", b"2"), ("b.png", png), ("b.cls", b"1")])
    url = f"file://{path}"
    assert expand_shards(url) == [url]
    local = [(e.key, dict(e.members)) for e in iter_shard(path)]
    remote = [(e.key, dict(e.members)) for e in iter_shard(url)]
    assert remote == local
    manifest = build_manifest([url])
    assert manifest.shards[0].count == 2 and manifest.shards[0].size_bytes is None


def test_globs_expand_in_sorted_order_lists_and_braces_in_the_order_written(tmp_path):
    for name in ("c", "a", "b"):  # written out of order: a directory listing need not be sorted
        _tar(tmp_path / f"s-{name}.tar", [(f"k{name}.cls", b"0")])
    (tmp_path / "s-dir.tar").mkdir()  # a folder never matches
    shard = {n: str(tmp_path / f"s-{n}.tar") for n in "abc"}
    assert expand_shards(str(tmp_path / "s-*.tar")) == [shard["a"], shard["b"], shard["c"]]
    assert expand_shards(str(tmp_path / "s-?.tar")) == [shard["a"], shard["b"], shard["c"]]
    assert expand_shards(str(tmp_path / "s-[cb].tar")) == [shard["b"], shard["c"]]
    assert expand_shards(str(tmp_path / "s-{c,a}.tar")) == [shard["c"], shard["a"]]
    assert expand_shards([shard["c"], str(tmp_path / "s-*.tar")]) == [shard["c"], shard["a"], shard["b"]]
    assert expand_shards(str(tmp_path / "s-{c,*}.tar")) == [shard["c"], shard["a"], shard["b"]]
    assert expand_shards(str(tmp_path / "**" / "s-a.tar")) == [shard["a"]]


def test_a_glob_that_matches_nothing_names_itself_in_one_line(tmp_path):
    _tar(tmp_path / "s-a.tar", [("k.cls", b"0")])
    missing = str(tmp_path / "t-*.tar")
    with pytest.raises(DataError) as err:
        expand_shards([str(tmp_path / "s-a.tar"), missing])
    assert str(err.value) == f"data glob {missing!r} matches no files"
    with pytest.raises(DataError) as err:
        expand_shards(str(tmp_path / "{s,t}-*.tar"))
    assert str(err.value) == f"data glob {missing!r} (from {str(tmp_path / '{s,t}-*.tar')!r}) matches no files"
    with pytest.raises(DataError, match=r"^data glob 'memory://nobucket-\w+/\*\.tar' matches no files$"):
        expand_shards(f"memory://nobucket-{tmp_path.name}/*.tar")


def test_url_globs_go_through_fsspec_and_keep_the_url_as_written(tmp_path):
    import fsspec

    png = _encode(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG")
    local = _tar(tmp_path / "u.tar", [("a.png", png), ("a.cls", b"2")])
    base = f"memory://bucket-{tmp_path.name}/train"
    for name in ("000002", "000000", "000001"):
        with fsspec.open(f"{base}-{name}.tar", "wb") as f:
            f.write(open(local, "rb").read())
    urls = expand_shards(f"{base}-*.tar")
    assert urls == expand_shards(f"{base}-{{000000..000002}}.tar") == [f"{base}-{i:06d}.tar" for i in range(3)]
    assert [e.key for e in iter_shard(urls[0])] == ["a"]
    file_urls = expand_shards(f"file://{tmp_path}/*.tar")
    assert file_urls == [f"file://{tmp_path}/u.tar"]
