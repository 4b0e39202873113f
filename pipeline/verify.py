"""Checking and describing a store: verify (markers, checksums, counts), recompute, inspect.

`verify` trusts nothing but the bytes: it re-hashes every Zarr shard file against its marker, so
one flipped byte names its unit. `recompute_check` replays stored augmentation on the raw images,
runs the teacher again and compares the cached attention with a fresh encoding of the new Q/K.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from attncache.pipeline.augment import Recipe
from attncache.pipeline.data import DataError, decode_sample, iter_shard, redact
from attncache.pipeline.factors import attention_kl, exact_logits
from attncache.pipeline.finite import NonFiniteValues
from attncache.pipeline.store import CacheStore, StoreError, Unit
from attncache.pipeline.teacher import Teacher, TeacherConfig
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


# ---------------------------------------------------------------------------------------------- recompute


def recompute_check(store: CacheStore, teacher_cfg: TeacherConfig, k: int, seed: int = 0,
                    tolerance: float = 1e-4) -> dict:
    """Re-run the teacher on k random cached samples: is the cache what the teacher says now?

    The cached attention is compared with the teacher's exact attention (KL) and with a fresh
    encoding of the recomputed Q/K: the two KLs must agree within `tolerance` (+10 %), since the
    encoding's own loss is expected and anything beyond it means the cache is wrong.
    """
    teacher = Teacher(teacher_cfg)
    require_same_teacher(store.meta["teacher"], teacher.identity())
    recipe = Recipe.from_json(store.meta["recipe"]["ops"])
    picks = _pick_samples(store, k, seed)
    results = []
    for (view, shard_index), slots in sorted(picks.items()):
        url = store.meta["dataset"]["shards"][shard_index]["url"]
        data = store.read_unit(view, shard_index)
        positions = {int(s - shard_index * store.slots_per_shard) for s in slots}
        for entry in iter_shard(url):
            if entry.position not in positions:
                continue
            if str(data.keys[entry.position]) != entry.key:
                raise DataError(f"{url}: position {entry.position} holds key {entry.key!r} but the cache has "
                                f"{data.keys[entry.position]!r}: the data changed since precompute")
            image, _ = decode_sample(url, entry)
            pixels = recipe.apply(data.aug[entry.position, :recipe.num_params], image)
            results.append(_compare(store, teacher, view, shard_index * store.slots_per_shard + entry.position,
                                    entry.key, pixels))
    kl_cache = [r["kl_cache"] for r in results]
    # a NaN KL compares False with everything: a cache holding inf/NaN must count as mismatched
    bad = [r for r in results if not r["kl_cache"] <= r["kl_fresh"] * 1.1 + tolerance]
    return {"samples": len(results), "max_kl": max(kl_cache, default=0.0), "mean_kl": float(np.mean(kl_cache)) if kl_cache else 0.0,
            "max_kl_fresh_encoding": max((r["kl_fresh"] for r in results), default=0.0),
            "mismatched": [{"view": r["view"], "key": r["key"], "kl_cache": r["kl_cache"], "kl_fresh": r["kl_fresh"]}
                           for r in bad], "ok": not bad and len(results) > 0}


def require_same_teacher(stored: dict, given: dict) -> None:
    """`--recompute` compares a cache with its own teacher only: another one is refused, naming what differs."""
    fields = [f for f in ("name", "model_args", "weights_sha256", "scale") if stored.get(f) != given.get(f)]
    if fields:
        shown = "; ".join(f"{f}: store has {_brief(stored.get(f))}, --teacher has {_brief(given.get(f))}" for f in fields)
        raise StoreError(f"--teacher is not the teacher this store was made with (teacher identity differs: {shown}); "
                         "pass the teacher, --model-arg, --checkpoint or --random-init/--seed used at precompute")


def _brief(value) -> str:
    text = value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _pick_samples(store: CacheStore, k: int, seed: int) -> dict[tuple[int, int], list[int]]:
    candidates = []
    for unit in store.units():  # any unit with a marker: the teacher judges its bytes, checksums or not
        if _has_marker(store, unit):
            start, stop = store.slot_range(unit.shard_index)
            valid = store.group[f"views/{unit.view}/valid"][start:stop]
            candidates += [(unit.view, unit.shard_index, start + int(p)) for p in np.flatnonzero(valid)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False) if candidates else []
    picks: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in chosen:
        view, shard, slot = candidates[int(i)]
        picks[(view, shard)].append(slot)
    return picks


def _has_marker(store: CacheStore, unit: Unit) -> bool:
    try:
        return store.read_marker(unit.view, unit.shard_index) is not None
    except SchemaError:
        return False


def _compare(store: CacheStore, teacher: Teacher, view: int, slot: int, key: str, pixels: torch.Tensor) -> dict:
    layers, heads = tuple(store.meta["layers"]), tuple(store.meta["heads"])
    q, k = teacher.capture(pixels.unsqueeze(0), layers, heads)
    ref = exact_logits(q, k, teacher.scale)
    cached = store.encoding.decode(store.read_factors(view, [slot]), "logits", teacher.scale)
    try:
        fresh = store.encoding.decode(store.encoding.encode(q, k, teacher.scale), "logits", teacher.scale)
        kl_fresh = float(attention_kl(ref, fresh).max())
    except NonFiniteValues:  # the teacher's values do not fit this encoding: no cache of it can be right
        kl_fresh = float("nan")
    kl_cache = attention_kl(ref, cached)
    return {"view": view, "key": key, "kl_fresh": kl_fresh,
            "kl_cache": float(kl_cache.max()) if bool(torch.isfinite(kl_cache).all()) else float("nan")}


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
        "encoding": meta["encoding"]["spec"], "compression": meta["compression"],
        "layers": meta["layers"], "heads": meta["heads"], "tokens": meta["tokens"],
        "units_done": done, "units_total": len(store.units()), "samples_written": written,
        "samples_skipped": skipped, "bytes_on_disk": store.bytes_on_disk(), "factor_bytes": factor_bytes,
        "bytes_per_sample": per_sample, "raw_fp32_map_bytes_per_sample": raw_fp32,
        "ratio_to_raw_fp32_maps": raw_fp32 / per_sample if per_sample else None,
        "fidelity_kl_per_layer": np.mean(kls, axis=0).round(8).tolist() if kls else None,
        "compute": meta["compute"],
    }
