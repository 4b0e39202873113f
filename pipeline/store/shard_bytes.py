"""One array's Zarr shard file as bytes in memory, encoded exactly as zarr would write it to the store.

Why: a unit's marker records every shard file's sha256. Letting zarr write the file and then reading
it back to hash it passed over every byte twice (a quarter of an `exact:fp16` precompute went to
writing and hashing). Encoding the shard into memory with the array's own metadata document, then
hashing and writing those bytes, hashes the very bytes that go to disk, once. The file is the one
zarr writes: same codecs, same chunk key, same index, because it is zarr's own encoder run on a
MemoryStore holding the array's `zarr.json` (tests/test_store_layout.py checks byte equality).
"""
from __future__ import annotations

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore


def encode_shard(array: zarr.Array, chunk_key: str, start: int, stop: int, block: np.ndarray,
                 write_empty_chunks: bool) -> bytes | None:
    """The bytes of `array`'s shard file `chunk_key` (array-relative, e.g. `c/3/0/0`) holding `block`
    at slots [start, stop) of the first axis; None when zarr would write no file (all fill values
    and `write_empty_chunks` off). The block must cover the whole shard: nothing is merged."""
    docs = dict(array.metadata.to_buffer_dict(default_buffer_prototype()))  # {"zarr.json": ...}
    memory = zarr.open_array(MemoryStore(store_dict=docs), mode="r+", zarr_format=3)
    if write_empty_chunks:
        memory = memory.with_config({"write_empty_chunks": True})
    memory[start:stop] = block
    encoded = docs.get(chunk_key)
    return None if encoded is None else encoded.to_bytes()
