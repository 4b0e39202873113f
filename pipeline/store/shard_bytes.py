"""One array's Zarr shard file as bytes in memory, encoded exactly as zarr would write it to the store.

Why: a unit's marker records every shard file's sha256. Letting zarr write the file and then reading
it back to hash it passed over every byte twice (a quarter of an `exact:fp16` precompute went to
writing and hashing). Encoding the shard in memory, then hashing and writing those bytes, hashes the
very bytes that go to disk, once.

Two encoders make the same bytes (tests/test_store_layout.py checks each against the file zarr
writes, for every kind of array and compressor the store makes):

- `_direct_parts`, for the factor arrays (numeric, fill 0, chunks that are whole slabs of slots,
  zstd / blosc / no compressor, the crc32c shard index at the end: every factor array the store
  creates). It compresses each inner chunk straight from the caller's block and returns the
  compressed chunks and the index as separate buffers. Why: zarr's generic path copied every chunk
  into a fill-value buffer, compared it with the fill value, ran the compressor on a thread pool
  beside the teacher's forward and joined the shard into one buffer, then `to_bytes` copied it
  again: 0.7 s of an 87 MB `exact:fp16` array, against 0.13 s of zstd itself (BENCHMARKS.md).
- zarr's own encoder on a MemoryStore holding the array's `zarr.json`, for everything else (keys,
  labels, other fills or chunkings).
"""
from __future__ import annotations

import sys

import google_crc32c
import numcodecs
import numpy as np
import zarr
from packaging.version import Version
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

_NO_CHUNK = np.uint64(2**64 - 1)  # the shard index's (offset, nbytes) of a chunk that has no bytes
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def encode_shard(array: zarr.Array, chunk_key: str, start: int, stop: int, block: np.ndarray,
                 write_empty_chunks: bool) -> bytes | None:
    """The bytes of `array`'s shard file `chunk_key` (array-relative, e.g. `c/3/0/0`) holding `block`
    at slots [start, stop) of the first axis; None when zarr would write no file (all fill values
    and `write_empty_chunks` off). The block must cover the whole shard: nothing is merged."""
    parts = encode_shard_parts(array, chunk_key, start, stop, block, write_empty_chunks)
    return None if parts is None else b"".join(parts)


def encode_shard_parts(array: zarr.Array, chunk_key: str, start: int, stop: int, block: np.ndarray,
                       write_empty_chunks: bool) -> list | None:
    """`encode_shard`'s bytes as buffers to write one after the other (the file is their
    concatenation), without joining them: a factor array's compressed chunks and its index."""
    if stop - start != block.shape[0] or tuple(array.shape[1:]) != block.shape[1:]:
        raise ValueError(f"a block of shape {block.shape} does not fill slots [{start}, {stop}) of an array "
                         f"of shape {array.shape}")
    direct = _direct_plan(array, block) if _is_shard(array, chunk_key, start, block) else None
    if direct is not None:
        return _direct_parts(block, *direct, write_empty_chunks)
    return _zarr_parts(array, chunk_key, start, stop, block, write_empty_chunks)


def parts_size(parts) -> int:
    """Bytes of the file that `parts` (buffers of any item type) make."""
    return sum(memoryview(p).nbytes for p in parts)


def _zarr_parts(array: zarr.Array, chunk_key: str, start: int, stop: int, block: np.ndarray,
                write_empty_chunks: bool) -> list | None:
    docs = dict(array.metadata.to_buffer_dict(default_buffer_prototype()))  # {"zarr.json": ...}
    memory = zarr.open_array(MemoryStore(store_dict=docs), mode="r+", zarr_format=3)
    if write_empty_chunks:
        memory = memory.with_config({"write_empty_chunks": True})
    memory[start:stop] = block
    encoded = docs.get(chunk_key)
    return None if encoded is None else [encoded.as_numpy_array()]


def _is_shard(array: zarr.Array, chunk_key: str, start: int, block: np.ndarray) -> bool:
    """Whether [start, start + len(block)) is one whole shard and `chunk_key` is its key (zarr's
    default `c/<i>/0/...`): the direct path encodes the block alone, so nothing else may be asked."""
    shard = block.shape[0]
    return (shard > 0 and start % shard == 0
            and chunk_key == "/".join(["c", str(start // shard)] + ["0"] * (block.ndim - 1)))


def _direct_plan(array: zarr.Array, block: np.ndarray):
    """(slots per inner chunk, compressor or None) when `_direct_parts` makes zarr's bytes for this
    array and block, else None (zarr's own encoder then). Every condition is one the direct path
    relies on; anything else, or a zarr whose metadata reads otherwise, takes the general path."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    sharding = meta.codecs[0]
    if sharding.index_location != ShardingCodecIndexLocation.end:
        return None
    index_codecs = list(sharding.index_codecs)
    if (len(index_codecs) != 2 or not isinstance(index_codecs[0], BytesCodec)
            or index_codecs[0].to_dict().get("configuration", {}).get("endian") != "little"
            or not isinstance(index_codecs[1], Crc32cCodec)):
        return None
    chunk = tuple(sharding.chunk_shape)
    shard = tuple(meta.chunk_grid.chunk_shape)
    if chunk[1:] != tuple(array.shape[1:]) or shard[1:] != chunk[1:] or shard[0] != block.shape[0] or shard[0] % chunk[0]:
        return None  # chunks must be whole slabs of slots, and the block one whole shard
    dtype = block.dtype
    if (dtype.kind not in "biuf" or dtype != np.dtype(array.dtype) or not block.flags.c_contiguous
            or (dtype.itemsize > 1 and dtype.byteorder not in ("<", "=" if sys.byteorder == "little" else "<"))):
        return None
    fill = np.asarray(meta.fill_value, dtype=dtype)
    if fill.tobytes() != bytes(dtype.itemsize):  # an empty chunk is then one of all-zero bytes
        return None
    codecs = list(sharding.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    endian = codecs[0].to_dict().get("configuration", {}).get("endian")
    if dtype.itemsize > 1 and endian != "little":
        return None
    if len(codecs) == 1:
        return chunk[0], None
    if len(codecs) != 2:
        return None
    compressor = _compressor(codecs[1])
    return None if compressor is None else (chunk[0], compressor)


def _compressor(codec):
    """The numcodecs codec that zarr's codec runs on a chunk's bytes, built as zarr builds it."""
    config = codec.to_dict().get("configuration", {})
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd.from_config({"level": config["level"], "checksum": config["checksum"]})
    if isinstance(codec, BloscCodec):
        blosc = {"cname": config["cname"], "clevel": config["clevel"],
                 "shuffle": _BLOSC_SHUFFLE[config["shuffle"]], "blocksize": config["blocksize"]}
        if _numcodecs_passes_typesize():
            blosc["typesize"] = config["typesize"]
        return numcodecs.Blosc.from_config(blosc)
    return None


def _numcodecs_passes_typesize() -> bool:
    """zarr gives blosc its `typesize` from numcodecs 0.16.0 on (before, blosc saw the chunk's bytes
    as 1-byte items): zarr's own comparison, pre-releases included, so the same bytes either way."""
    return Version(numcodecs.__version__) >= Version("0.16.0")


def _direct_parts(block: np.ndarray, slots: int, compressor, write_empty_chunks: bool) -> list | None:
    """Each inner chunk (a C-contiguous slab of `slots` slots, so a view of the block) through the
    compressor, in order (the shard's chunk grid is one axis, where zarr's Morton order is plain
    order); all-zero chunks left out unless `write_empty_chunks`, as zarr leaves out chunks equal to
    the fill value; then the index of (offset, nbytes) pairs, little-endian uint64, and its crc32c."""
    count = block.shape[0] // slots
    index = np.full((count, 2), _NO_CHUNK, dtype="<u8")
    parts, offset = [], 0
    for i in range(count):
        raw = block[i * slots:(i + 1) * slots].reshape(-1).view(np.uint8)
        if not write_empty_chunks and not raw.any():
            continue
        data = raw if compressor is None else compressor.encode(raw)
        nbytes = parts_size([data])
        index[i] = offset, nbytes
        parts.append(data)
        offset += nbytes
    if not parts:
        return None
    index_bytes = index.tobytes()  # the grid is (count, 1, ..., 1): C order is this order
    parts.append(index_bytes + np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes())
    return parts
