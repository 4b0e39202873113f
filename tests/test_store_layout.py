"""The store's layout arithmetic and marker bytes, without a store on disk; the one file layer on a
local folder and on an fsspec URL through the same calls."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from attncache.pipeline._util.files import Files, is_local
from attncache.pipeline.store import layout
from attncache.pipeline.store.layout import Unit
from attncache.pipeline.store.markers import encode_marker, parse_marker, sha256_hex
from attncache.storage_schema import SchemaError

META = {"views": 2, "dataset": {"shards": [{"url": "/d/a-000.tar"}, {"url": "s3://b/a-001.tar?token=x"}]},
        "arrays": {"key": {"path": "key", "trailing_shape": []}, "aug": {"path": "aug", "trailing_shape": [5]},
                   "a": {"path": "factors/a", "trailing_shape": [3, 2, 17, 8]}}}


def test_slots_units_and_paths_follow_the_schema():
    assert layout.slot_range(0, 256) == (0, 256) and layout.slot_range(3, 8) == (24, 32)
    assert layout.units(META) == [Unit(0, 0, "/d/a-000.tar"), Unit(0, 1, "s3://b/a-001.tar?token=x"),
                                  Unit(1, 0, "/d/a-000.tar"), Unit(1, 1, "s3://b/a-001.tar?token=x")]
    assert layout.unit_files(META, 1, 7) == ["views/1/key/c/7", "views/1/aug/c/7/0", "views/1/factors/a/c/7/0/0/0/0"]
    assert layout.marker_path(1, 7) == "units/1/000007.json"
    assert layout.array_path(0, META["arrays"]["a"]) == "views/0/factors/a"
    assert Unit(0, 1, "s3://b/a-001.tar?token=x").name.startswith("view 0 shard 000001 (a-001.tar")


def test_chunking_keeps_base_arrays_whole_and_factor_chunks_small():
    assert [layout.factor_chunk_slots(n) for n in (1, 8, 16, 24, 256, 17)] == [1, 8, 16, 12, 16, 1]
    assert layout.inner_chunk_slots("key", 256) == 256 and layout.inner_chunk_slots("a", 256) == 16


def test_compression_specs_parse_and_bad_ones_name_the_fix():
    assert layout.parse_compression("zstd:5:shuffle") == {"codec": "zstd", "level": 5, "shuffle": "byte"}
    assert layout.parse_compression("none") == {"codec": "none", "level": 0, "shuffle": "none"}
    assert layout.compressors(layout.parse_compression("none")) is None
    with pytest.raises(ValueError, match="blosc"):
        layout.parse_compression("zstd:12:bitshuffle")


@pytest.mark.parametrize("spec,blocksize", [("zstd:1:shuffle:block=1M", 1 << 20), ("zstd:3:bitshuffle:block=64K", 65536),
                                            ("zstd:9:shuffle:block=5000", 5000), ("zstd:0:shuffle:block=4K", 4096),
                                            ("zstd:1:shuffle:block=256M", 256 << 20), ("zstd:1:shuffle:block=4m", 4 << 20)])
def test_a_blosc_block_size_is_recorded_and_written_back_as_the_same_spec(spec, blocksize):
    parsed = layout.parse_compression(spec)
    assert parsed["blocksize"] == blocksize
    assert layout.parse_compression(layout.compression_spec(parsed)) == parsed
    assert layout.compressors(parsed).blocksize == blocksize
    assert "blocksize" not in layout.parse_compression("zstd:1:shuffle")  # absent unless given: old ids unchanged


@pytest.mark.parametrize("spec,says", [
    ("zstd:1:block=1M", "only a shuffle uses: zstd:1:shuffle:block=1M"),
    ("zstd:1:shuffle:block=2K", "not in 4096..268435456"), ("zstd:1:shuffle:block=257M", "not in 4096..268435456"),
    ("zstd:1:shuffle:block=0", "not in 4096"), ("zstd:1:shuffle:block=-1M", "is not 'block=SIZE'"),
    ("zstd:1:shuffle:block=1.5M", "is not 'block=SIZE'"), ("zstd:1:shuffle:block=1G", "is not 'block=SIZE'"),
    ("zstd:1:shuffle:block=", "is not 'block=SIZE'"), ("zstd:1:shuffle:1M", "is not 'block=SIZE'"),
    ("zstd:1:shuffle:block=\uff11M", "is not 'block=SIZE'"), ("zstd:1:shuffle:block=99999999999999999999M", "not in"),
    ("zstd:1:shuffle:block=1M:x", "expected 'zstd[:LEVEL][:shuffle|bitshuffle[:block=SIZE]]' or 'none'"),
    ("zstd:3:noshuffle:block=1M", "only a shuffle uses: zstd:3:shuffle:block=1M"),
    ("zstd:1:shuffle:block=" + "9" * 5000, "block above 256M is not in"),
    ("zstd:+3", "level '+3' is not an integer"), ("zstd:1_0:shuffle", "level '1_0' is not an integer"),
    ("zstd:\u0663", "is not an integer")])
def test_a_bad_blosc_block_size_is_one_line_naming_it(spec, says):
    with pytest.raises(ValueError, match=re.escape(says)) as refused:
        layout.parse_compression(spec)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 5200


def test_the_schema_takes_a_block_size_only_with_a_shuffle():
    """A store's recorded compression with a blosc block but no blosc (edited or foreign metadata) is
    refused by the schema, as the grammar refuses `zstd:3:noshuffle:block=1M`."""
    import jsonschema

    schema = json.loads((Path(layout.__file__).parents[2] / "storage_schema" / "store_v2.json").read_text())
    compression = jsonschema.Draft202012Validator(schema["properties"]["compression"])
    assert compression.is_valid(layout.parse_compression("zstd:1:shuffle:block=1M"))
    assert compression.is_valid(layout.parse_compression("zstd:3"))
    for bad in ({"codec": "zstd", "level": 3, "shuffle": "none", "blocksize": 1 << 20},
                {"codec": "none", "level": 0, "shuffle": "none", "blocksize": 1 << 20},
                {"codec": "zstd", "level": 1, "shuffle": "byte", "blocksize": 1024},
                {"codec": "zstd", "level": 1, "shuffle": "byte", "blocksize": 1500000.5}):
        assert not compression.is_valid(bad), bad


def test_all_fill_sees_strings_and_numbers():
    assert layout.all_fill(np.array(["", ""], dtype=object), "") and not layout.all_fill(np.array(["", "k"], dtype=object), "")
    assert layout.all_fill(np.full(4, -1), -1) and not layout.all_fill(np.zeros(4), -1)


def test_a_marker_that_is_not_json_or_of_another_cache_is_refused():
    with pytest.raises(SchemaError, match="units/0/000000.json: marker is not JSON"):
        parse_marker(b"{", "units/0/000000.json", "c" * 64)
    assert sha256_hex(None) is None and sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    marker = {"b": 1, "a": [2]}
    assert encode_marker(marker) == json.dumps(marker, indent=1, sort_keys=True).encode()


@pytest.mark.parametrize("root", ["local", "memory://layer-test/store"])
def test_one_file_layer_serves_a_folder_and_a_url_alike(tmp_path, root):
    root = str(tmp_path / "store") if root == "local" else root
    files = Files(root)
    assert files.local == is_local(root) == (root != "memory://layer-test/store")
    files.ensure_root()
    assert files.read("units/0/000000.json") is None and files.size("units/0/000000.json") is None
    files.write_atomic("units/0/000000.json", b"one")
    files.write_atomic("units/0/000000.json", b"two!")
    assert files.read("units/0/000000.json") == b"two!" and files.size("units/0/000000.json") == 4
    assert files.is_file("units/0/000000.json") and not files.is_file("units/0/000001.json")
    assert files.create("lease", b"x") and not files.create("lease", b"y") and files.read("lease") == b"x"
    assert files.age("lease") is None or files.age("lease") >= 0
    files.delete("lease")
    files.delete("lease")  # deleting what is gone is no error
    assert files.read("lease") is None
    assert files.local_files() == (["units/0/000000.json"] if files.local else [])
    assert files.total_bytes() == 4
    assert (files.local_path("x") is None) != files.local


@pytest.mark.parametrize("compression", ["zstd:3", "zstd:1", "zstd:1:shuffle", "zstd:3:shuffle", "zstd:5:bitshuffle",
                                         "zstd:1:shuffle:block=1M", "zstd:3:bitshuffle:block=8K", "none"])
def test_a_shard_encoded_in_memory_is_the_file_zarr_writes(tmp_path, compression, monkeypatch):
    """The store hashes and writes shard bytes encoded in memory (store/shard_bytes.py): they must be
    byte for byte the file zarr itself writes for the same block, for every kind of array, fill-only
    blocks included (which zarr writes only with write_empty_chunks), by the direct encoder where it
    applies (every factor array) and by zarr's own elsewhere; and the parts the store writes one
    after the other must be those bytes."""
    import zarr
    from zarr.codecs import ZstdCodec

    from attncache.pipeline.store import shard_bytes
    from attncache.pipeline.store.shard_bytes import encode_shard, encode_shard_parts

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    partly_zero = rng.standard_normal((8, 3, 2, 17, 8)).astype(np.float16)
    partly_zero[:4] = 0  # an empty inner chunk beside a full one: zarr leaves it out of the shard
    minus_zero = np.zeros((8, 6), dtype=np.float32)
    minus_zero[4:] = -0.0  # not zero bits: zarr keeps the chunk
    uint4 = rng.integers(0, 256, (8, 3, 2, 17, 4), dtype=np.uint8)
    uint4[4:] = 0
    bf16_bits = rng.integers(0, 2**16, (8, 2, 9, 8), dtype=np.uint16)
    blocks = {"key": (np.array([f"k{i}" if i % 3 else "" for i in range(8)], dtype=object), ""),
              "label": (rng.integers(-1, 10, 8), -1), "aug": (rng.standard_normal((8, 5)), 0),
              "a": (rng.standard_normal((8, 3, 2, 17, 8)).astype(np.float16), 0),
              "partly_zero": (partly_zero, 0), "minus_zero": (minus_zero, 0), "uint4": (uint4, 0),
              "bf16_bits": (bf16_bits, 0), "int8": (rng.integers(-128, 128, (8, 7), dtype=np.int8), 0),
              "scales": (rng.standard_normal((8, 3, 5)).astype(np.float32) * 1e30, 0),
              "empty": (np.zeros((8, 3, 4), dtype=np.int8), 0)}
    direct = []
    real_direct = shard_bytes._direct_parts
    monkeypatch.setattr(shard_bytes, "_direct_parts", lambda block, *a: direct.append(block.shape) or real_direct(block, *a))
    for name, (block, fill) in blocks.items():
        trailing = block.shape[1:]
        array = group.create_array(name, shape=(24, *trailing), dtype=str if block.dtype == object else block.dtype,
                                   chunks=(4, *trailing), shards=(8, *trailing), fill_value=fill,
                                   compressors=ZstdCodec(level=3) if block.dtype == object else
                                   layout.compressors(layout.parse_compression(compression)))
        empty = layout.all_fill(block, fill)
        key = "/".join(["c", "1"] + ["0"] * len(trailing))
        calls = len(direct)
        data = encode_shard(array, key, 8, 16, block, empty)
        assert (len(direct) > calls) == (name not in ("key", "label")), name  # the direct path ran where it applies
        parts = encode_shard_parts(array, key, 8, 16, block, empty)
        (array.with_config({"write_empty_chunks": True}) if empty else array)[8:16] = block
        on_disk = (tmp_path / "s.zarr" / name / "c" / "1").joinpath(*["0"] * len(trailing))
        assert data == on_disk.read_bytes(), name
        assert b"".join(parts) == data, name
        np.testing.assert_array_equal(array[8:16], block)  # and zarr reads the block back from it
    assert encode_shard(group["empty"], "c/1/0/0", 8, 16, blocks["empty"][0], False) is None
    with pytest.raises(ValueError, match="does not fill slots"):
        encode_shard(group["a"], "c/1/0/0/0/0", 8, 16, blocks["a"][0][:4], False)
    calls = len(direct)  # slots that are not one whole shard, or a key that is not theirs: zarr's own encoder
    for key, start in (("c/1/0/0/0/0", 4), ("c/2/0/0/0/0", 8)):
        zarr_parts = shard_bytes._zarr_parts(group["a"], key, start, start + 8, blocks["a"][0], False)
        expected = None if zarr_parts is None else b"".join(zarr_parts)
        assert encode_shard(group["a"], key, start, start + 8, blocks["a"][0], False) == expected
    assert len(direct) == calls


def test_the_store_writes_the_parts_of_a_shard_as_one_file(tmp_path):
    """A list of buffers is one file, their concatenation, locally and on an fsspec URL; a part that
    cannot be written leaves the old file and no temp file."""
    parts = [b"abc", np.arange(5, dtype=np.uint8), memoryview(b"xyz")]
    for root in (str(tmp_path / "store"), "memory://layer-test/parts"):
        files = Files(root)
        files.write_replace("views/0/a/c/0", parts)
        assert files.read("views/0/a/c/0") == b"abc\x00\x01\x02\x03\x04xyz"
    files = Files(str(tmp_path / "store"))
    with pytest.raises((TypeError, ValueError, BufferError)):
        files.write_replace("views/0/a/c/0", [b"new", np.arange(8, dtype=np.uint8)[::2]])  # not contiguous
    assert files.read("views/0/a/c/0") == b"abc\x00\x01\x02\x03\x04xyz"
    assert sorted(p.name for p in (tmp_path / "store" / "views/0/a/c").iterdir()) == ["0"]


@pytest.mark.parametrize("root", ["local", "memory://layer-test/replace"])
def test_write_replace_puts_the_whole_file_and_leaves_no_temp(tmp_path, root):
    root = str(tmp_path / "store") if root == "local" else root
    files = Files(root)
    files.write_replace("views/0/a/c/0", b"old bytes")
    files.write_replace("views/0/a/c/0", b"new")
    assert files.read("views/0/a/c/0") == b"new" and files.size("views/0/a/c/0") == 3
    assert files.local_files() == (["views/0/a/c/0"] if files.local else [])


def test_all_fill_answers_as_the_whole_comparison_whatever_the_strided_sample_sees():
    """`all_fill` looks at a strided sample first: a block whose only non-fill value sits between the
    sampled positions must still count as holding data (else zarr would be told to write no file)."""
    import numpy as np

    from attncache.pipeline.store.layout import all_fill

    for dtype, fill in ((np.float16, 0), (np.int8, 0), (np.int64, -1), (np.uint8, 0)):
        block = np.full((4, 3, 5000), fill, dtype=dtype)
        assert all_fill(block, fill)
        for where in ((0, 0, 1), (3, 2, 4999), (2, 1, 2500)):  # none of them a multiple of the stride
            other = block.copy()
            other[where] = 1
            assert not all_fill(other, fill), (dtype, where)
    assert all_fill(np.zeros((0, 3)), 0)
    assert all_fill(np.array(["", ""], dtype=object), "") and not all_fill(np.array(["", "k"], dtype=object), "")
