"""A unit's marker as bytes: parsed and validated on read, built and encoded on write, checksums.

The marker (JSON: counts, skipped keys, sha256 and size of each Zarr shard file the unit owns, the
digest of the metadata it was written under) is the one thing that makes a unit done; it is written
last and atomically by the store (store/cache.py). When a marker covers its unit is decided in
store/integrity.py. Pure functions: bytes in, dicts out, so every rule here is tested without a store.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from attncache.pipeline.data.shards import redact
from attncache.pipeline.store.layout import Unit
from attncache.storage_schema import SCHEMA_VERSION, SchemaError, validate_marker


def sha256_hex(data: bytes | None) -> str | None:
    """The checksum a marker records for a file's bytes (None: the file is missing)."""
    return None if data is None else sha256_parts([data])


def sha256_parts(parts) -> str:
    """`sha256_hex` of the concatenation of buffers, without joining them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def parse_marker(raw: bytes, where: str, cache_id: str) -> dict:
    """The marker in `raw`; SchemaError when it is not JSON, fails its schema or names another cache."""
    try:
        marker = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where}: marker is not JSON ({exc})") from exc
    validate_marker(marker, where=where)
    if marker["cache_id"] != cache_id:
        raise SchemaError(f"{where}: marker belongs to another cache ({marker['cache_id'][:12]})")
    return marker


def new_marker(cache_id: str, unit: Unit, *, slot_start: int, count: int, valid: np.ndarray, skipped: list[dict],
               files: dict[str, str], sizes: dict[str, int | None], metadata_sha256: str,
               fidelity_kl: list[float] | None, seconds: float, shard: tuple[str | None, str | None]) -> dict:
    """The marker of a unit just written, validated against its schema. `shard`: sha256 of the input
    tar and of its members' names and sizes (pipeline/data/binding.py)."""
    marker = {"schema_version": SCHEMA_VERSION, "cache_id": cache_id, "view": unit.view,
              "shard_index": unit.shard_index, "shard_url": redact(unit.url), "shard_sha256": shard[0],
              "shard_members_sha256": shard[1],
              "slot_start": slot_start, "count": count, "written": int(valid.sum()), "skipped": skipped,
              "files": files, "sizes": sizes, "metadata_sha256": metadata_sha256,
              "fidelity_kl": fidelity_kl, "seconds": round(float(seconds), 3)}
    validate_marker(marker)
    return marker


def encode_marker(marker: dict) -> bytes:
    """The marker's bytes on disk (sorted keys: the same unit always gives the same file)."""
    return json.dumps(marker, indent=1, sort_keys=True).encode()
