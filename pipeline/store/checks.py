"""Checking and describing a store without running a model: verify (markers, checksums, counts), inspect.

`verify` trusts nothing but the bytes: it re-hashes every Zarr shard file against its marker, so
one flipped byte names its unit. `verify --recompute` runs the teacher again: tools/recompute.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from attncache.pipeline.data.shards import redact
from attncache.pipeline.store.cache import CacheStore, Unit
from attncache.storage_schema import SchemaError


@dataclass
class VerifyReport:
    path: str
    units_total: int = 0
    units_ok: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: str, progress: bool = False) -> VerifyReport:
    report = VerifyReport(str(path))
    try:
        store = CacheStore.open(path)
    except Exception as exc:  # noqa: BLE001 - a store that cannot open is the one problem to report
        report.problems.append(f"store: {redact(str(exc), str(path))}")
        return report
    shards = store.meta["dataset"]["shards"]
    for unit in tqdm(store.units(), desc="verify", unit="unit", disable=not progress):
        report.units_total += 1
        problems = _check_unit(store, unit, shards[unit.shard_index]["count"])
        if problems:
            report.problems += [f"{unit.name}: {p}" for p in problems]
        else:
            report.units_ok += 1
    return report


def quick_problems(store: CacheStore) -> list[str]:
    """What `train` checks before its first step, without hashing: every unit has a valid marker
    whose counts add up, that covers the store's metadata and every array of the unit, and whose
    files exist with their recorded sizes. A unit's bytes are checked against its marker's sha256
    when the loader reads it, so a flipped bit is caught before use."""
    problems = []
    shards = store.meta["dataset"]["shards"]
    for unit in store.units():
        found = _check_marker(store, unit, shards[unit.shard_index]["count"])
        if isinstance(found, list):
            problems += [f"{unit.name}: {p}" for p in found]
            continue
        problems += [f"{unit.name}: {p}" for p in store.file_problems(unit.view, unit.shard_index, found, full=False)]
    return problems


def _check_marker(store: CacheStore, unit: Unit, expected_count: int) -> list[str] | dict:
    """The unit's marker, or the problems that make it unusable."""
    try:
        marker = store.read_marker(unit.view, unit.shard_index)
    except SchemaError as exc:
        return [f"bad marker: {exc}"]
    if marker is None:
        return ["missing (no marker: never written, interrupted, or marker deleted)"]
    problems = []
    if marker["count"] != expected_count:
        problems.append(f"marker counts {marker['count']} samples, dataset manifest has {expected_count}")
    if marker["written"] + len(marker["skipped"]) != marker["count"]:
        problems.append(f"written {marker['written']} + skipped {len(marker['skipped'])} != count {marker['count']}")
    return problems or marker


def _check_unit(store: CacheStore, unit: Unit, expected_count: int) -> list[str]:
    found = _check_marker(store, unit, expected_count)
    if isinstance(found, list):
        return found
    return store.file_problems(unit.view, unit.shard_index, found)


# ---------------------------------------------------------------------------------------------- inspect


def inspect_store(path: str) -> dict:
    store = CacheStore.open(path)
    meta = store.meta
    done, written, skipped, factor_bytes, kls = 0, 0, 0, 0, []
    for unit in store.units():
        try:
            marker = store.read_marker(unit.view, unit.shard_index)
        except SchemaError:  # a bad marker is verify's to report; here the unit is just not done
            marker = None
        if marker is None:
            continue
        done += 1
        written += marker["written"]
        skipped += len(marker["skipped"])
        factor_bytes += store.unit_factor_bytes(unit)
        if marker.get("fidelity_kl"):
            kls.append(marker["fidelity_kl"])
    n_tokens, n_layers, n_heads = meta["tokens"]["count"], len(meta["layers"]), len(meta["heads"])
    raw_fp32 = n_layers * n_heads * n_tokens * n_tokens * 4
    per_sample = factor_bytes / written if written else 0.0
    return {
        "path": redact(str(path)), "cache_id": meta["cache_id"], "schema_version": meta["schema_version"],
        "teacher": meta["teacher"]["name"], "teacher_weights_sha256": meta["teacher"]["weights_sha256"],
        "recipe": meta["recipe"]["spec"], "seed": meta["seed"], "views": meta["views"],
        "encoding": store.encoding.spec,  # the spec that writes this store (`fit=eigh` for older ones)
        "compression": meta["compression"],
        "layers": meta["layers"], "heads": meta["heads"], "tokens": meta["tokens"],
        "units_done": done, "units_total": len(store.units()), "samples_written": written,
        "samples_skipped": skipped, "bytes_on_disk": store.bytes_on_disk(), "factor_bytes": factor_bytes,
        "bytes_per_sample": per_sample, "raw_fp32_map_bytes_per_sample": raw_fp32,
        "ratio_to_raw_fp32_maps": raw_fp32 / per_sample if per_sample else None,
        "fidelity_kl_per_layer": np.mean(kls, axis=0).round(8).tolist() if kls else None,
        "compute": meta["compute"],
    }
