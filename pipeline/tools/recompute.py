"""`verify --recompute`: replay the stored augmentation on the raw images, run the teacher again and
compare the cached attention with a fresh encoding of the new Q/K."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.shards import DataError, decode_sample, iter_shard
from attncache.pipeline.encodings.kl import attention_kl, exact_logits
from attncache.pipeline.encodings.finite import NonFiniteValues
from attncache.pipeline.store.cache import CacheStore, Unit
from attncache.pipeline.store.meta import StoreError
from attncache.pipeline.teacher.model import Teacher, TeacherConfig
from attncache.storage_schema import SchemaError


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
                         "pass the teacher, --model-arg, --teacher-checkpoint or --random-init/--seed used at precompute")


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
