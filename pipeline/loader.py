"""Streaming loader: units in a seeded order, split over ranks and loader workers, tar + cache joined.

An epoch is a list of units (input shard, view): the shards in an order drawn from (seed, epoch),
view `epoch mod V`. Rank r takes units r, r + R, ...; loader worker w of that rank takes every
W-th of those, so units are split without overlap or loss. A worker reads the unit's tar shard and
its cache shard together, joins them on `__key__` by position (a mismatch is an error naming both
keys), replays the stored augmentation on the raw image (never redrawing), and passes samples
through a shuffle buffer seeded by (seed, epoch, rank, worker). Factors travel encoded (int8, fp16);
decoding to logits happens batched on the training device (`pipeline/signals.py`).

Without a cache (online teacher, scratch, finetune) the same loader draws the augmentation from
(seed, key, view) as precompute would, with view = epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.augment import Recipe
from pipeline.data import DEFAULT_MAX_SAMPLE_BYTES, DataError, decode_sample, expand_shards, iter_shard
from pipeline.mix import draw_and_mix_unit, mix_targets, replay_unit
from pipeline.store import BASE_ARRAYS, CacheStore, StoreError


class CacheCorrupt(StoreError):
    """A unit's bytes do not match its marker: refuse to train on it."""


@dataclass(frozen=True)
class StreamConfig:
    shards: tuple[str, ...]  # tar URLs in store order (cache) or data order (no cache)
    recipe_json: tuple  # Recipe.to_json() as a tuple, so the config stays hashable and picklable
    num_classes: int
    cache: str | None = None
    seed: int = 0
    views: int | None = None  # distinct views: the store's V, or None for a new view every epoch
    smoothing: float = 0.0
    shuffle_buffer: int = 256
    with_factors: bool = True
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES  # bigger samples are never read (see pipeline/data_tar.py)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_json(list(self.recipe_json))


def match_shards(store: CacheStore, data: tuple[str, ...]) -> tuple[str, ...]:
    """The user's shard URLs in the store's shard order, each bound to its exact shard (URL, else the
    longest path tail only it shares: data may have moved; pipeline/shard_binding.py) and refused if
    its size or its members' names and sizes are no longer those the teacher saw."""
    from pipeline.shard_binding import check_store_data

    return tuple(check_store_data(store, data, full=False))


# ---------------------------------------------------------------------------------------------- epoch plan


def epoch_order(num_shards: int, epoch: int, seed: int) -> list[int]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xE90C]))
    return [int(i) for i in rng.permutation(num_shards)]


def split_units(order: list[int], rank: int, world: int, worker: int, workers: int) -> list[int]:
    """The shard indices one loader worker of one rank reads: disjoint, and together all of them."""
    return order[rank::world][worker::max(workers, 1)]


def view_of(epoch: int, views: int | None) -> int:
    return epoch if views is None else epoch % views


def loader_workers(units: int, workers: int) -> int:
    """Loader processes actually started: never more than the rank has units."""
    return min(workers, max(1, units))


def rank_batches(counts: list[int], order: list[int], rank: int, world: int, workers: int, batch_size: int) -> int:
    """Batches one rank yields in an epoch: each worker batches its own units' samples."""
    mine = order[rank::world]
    w = max(1, loader_workers(len(mine), workers))
    return sum(-(-sum(counts[i] for i in mine[j::w]) // batch_size) for j in range(w))


def steps_in_epoch(counts: list[int], epoch: int, seed: int, world: int, workers: int, batch_size: int) -> int:
    """Steps of an epoch: the most batches any rank has (the others take part with empty batches)."""
    order = epoch_order(len(counts), epoch, seed)
    return max(rank_batches(counts, order, r, world, workers, batch_size) for r in range(world))


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Sample:
    key: str
    image_CHW: torch.Tensor
    target_C: torch.Tensor
    label: int
    factors: dict[str, np.ndarray]


def _unit_from_cache(store: CacheStore, url: str, shard_index: int, view: int):
    marker = store.read_marker(view, shard_index)
    where = f"{store.path}: view {view} shard {shard_index:06d}"
    if marker is None:
        raise StoreError(f"{where}: unit not done (no marker); finish the precompute (re-run it to resume)")
    problems = store.file_problems(view, shard_index, marker)
    if problems:
        raise CacheCorrupt(f"{where}: {'; '.join(problems)}; run `attncache verify` and re-run the same precompute "
                           "command with --repair")
    return store.read_unit(view, shard_index)


def read_unit_samples(cfg: StreamConfig, recipe: Recipe, store: CacheStore | None, shard_index: int,
                      epoch: int) -> list[Sample]:
    """Every usable sample of one unit, images replayed (cache) or drawn (no cache), in tar order."""
    url = cfg.shards[shard_index]
    view = view_of(epoch, cfg.views)
    cached = _unit_from_cache(store, url, shard_index, view) if store is not None else None
    images, labels, keys = {}, {}, {}
    for entry in iter_shard(url, cfg.max_sample_bytes):
        p = entry.position
        if cached is not None:
            if p >= len(cached.valid):
                raise DataError(f"{url}: has more samples than the cache recorded ({len(cached.valid)} slots)")
            if not cached.valid[p]:
                continue  # skipped at precompute; its reason is in the unit's marker
            if str(cached.keys[p]) != entry.key:
                raise DataError(f"{url}: sample at position {p} has key {entry.key!r} but the cache has "
                                f"{str(cached.keys[p])!r}: the shard changed since precompute")
        # a bad sample is an error here: with a cache the teacher saw it, so the shard changed since
        # precompute; without one, precompute (--on-bad-sample skip) is where skipping is recorded
        image, label = decode_sample(url, entry)
        images[p], labels[p], keys[p] = image, label, entry.key
    bad = [(keys[p], labels[p]) for p in images if not 0 <= labels[p] < cfg.num_classes]
    if bad:
        raise DataError(f"{url}: sample {bad[0][0]!r} has label {bad[0][1]} outside [0, {cfg.num_classes}) "
                        f"({len(bad)} such samples in the shard); check --num-classes")
    if cached is not None:
        expected = set(int(p) for p in np.flatnonzero(cached.valid))
        if set(images) != expected:
            lost = sorted(expected - set(images))[:5]
            raise DataError(f"{url}: cached samples at positions {lost} are missing from the shard")
        aug = {p: cached.aug[p, :recipe.num_params] for p in images}
        pixels = replay_unit(recipe, images, aug)
    else:
        aug, pixels = draw_unit(recipe, images, keys, cfg.seed, view)
    positions = sorted(images)
    aug_BP = np.stack([aug[p] for p in positions]) if positions else np.zeros((0, recipe.num_params))
    targets = mix_targets(recipe, aug_BP, positions, [labels[p] for p in positions], labels, cfg.num_classes,
                          cfg.smoothing)
    samples = []
    for i, p in enumerate(positions):
        factors = {}
        if cached is not None and cfg.with_factors:
            factors = {n: a[p] for n, a in cached.factors.items() if n not in BASE_ARRAYS}
        samples.append(Sample(keys[p], pixels[p], targets[i], labels[p], factors))
    return samples


def draw_unit(recipe: Recipe, images: dict, keys: dict, seed: int, view: int):
    """What precompute would store and the teacher would see, drawn now (no cache): per-sample
    ops from (seed, key, view), then the pair op among the unit's usable samples."""
    aug, base = {}, {}
    for p in sorted(images):
        aug[p], base[p] = recipe.draw_and_apply(images[p], seed, keys[p], view)
    if not recipe.has_pairs or not aug:
        return aug, base
    return draw_and_mix_unit(recipe, seed, view, keys, aug, base)


class CacheStream(torch.utils.data.IterableDataset):
    """One epoch of one rank's samples; each loader worker reads its own units."""

    def __init__(self, cfg: StreamConfig, epoch: int, rank: int = 0, world: int = 1):
        self.cfg, self.epoch, self.rank, self.world = cfg, epoch, rank, world

    def units(self, worker: int, workers: int) -> list[int]:
        order = epoch_order(len(self.cfg.shards), self.epoch, self.cfg.seed)
        return split_units(order, self.rank, self.world, worker, workers)

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        store = CacheStore.open(self.cfg.cache) if self.cfg.cache else None
        recipe = self.cfg.recipe
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self.epoch, self.rank, worker, 0xB0F]))
        buffer: list[Sample] = []
        for shard_index in self.units(worker, workers):
            for sample in read_unit_samples(self.cfg, recipe, store, shard_index, self.epoch):
                if self.cfg.shuffle_buffer <= 1:
                    yield sample
                elif len(buffer) < self.cfg.shuffle_buffer:
                    buffer.append(sample)
                else:
                    i = int(rng.integers(len(buffer)))
                    buffer[i], sample = sample, buffer[i]
                    yield sample
        order = rng.permutation(len(buffer))
        for i in order:
            yield buffer[i]


def collate(samples: list[Sample]) -> dict:
    """Images [B, 3, S, S], targets [B, C], labels [B], keys, and encoded factors [B, ...] (bf16
    bits as int16, since torch has no uint16 arithmetic)."""
    factors = {}
    for name in (samples[0].factors if samples else {}):
        stacked = np.stack([s.factors[name] for s in samples])
        factors[name] = torch.from_numpy(stacked.view(np.int16) if stacked.dtype == np.uint16 else stacked)
    return {"image": torch.stack([s.image_CHW for s in samples]),
            "target": torch.stack([s.target_C for s in samples]),
            "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
            "key": [s.key for s in samples], "factors": factors}


def epoch_loader(cfg: StreamConfig, epoch: int, batch_size: int, workers: int, rank: int = 0,
                 world: int = 1) -> torch.utils.data.DataLoader:
    """Batches of one rank for one epoch. Each worker forms its own batches (its last one may be
    short), and the DataLoader takes them from the workers in turn: the order is fixed by the
    worker count, not by timing."""
    dataset = CacheStream(cfg, epoch, rank, world)
    workers = loader_workers(len(dataset.units(0, 1)), workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                       prefetch_factor=2 if workers else None, persistent_workers=False)
