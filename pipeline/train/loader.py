"""Streaming loader: an epoch's units decoded by loader workers, batches assembled in a fixed order.

The order of an epoch's samples is decided up front (`pipeline/train/loader_order.py`): units (input
shard, view) in an order drawn from (seed, epoch), view `epoch mod V`, a disjoint share per rank,
samples permuted within windows of several units. Loader workers only decode whole units: a worker
reads the unit's tar shard and its cache shard together, joins them on `__key__` by position (a
mismatch is an error naming both keys) and replays the stored augmentation on the raw image (never
redrawing). The main process receives the decoded units in unit order (a map-style dataset over the
rank's units, which the DataLoader returns in index order whatever the worker count), permutes each
window and cuts batches. So the batches (the keys in each, in order) depend on (seed, epoch, world
size, batch size, interleave, shuffle buffer) only, never on `workers`: the worker count changes
speed and memory (each worker holds the unit it decodes, two ahead), not what is trained on. Each
process fetches the store objects of the unit it reads next while it decodes the current one
(`pipeline/train/prefetch.py`; `StreamConfig.prefetch=False` turns it off, same batches either way).
Factors travel encoded (int8, fp16); decoding to logits happens batched on the training device
(`pipeline/train/signals.py`).

Without a cache (online teacher, scratch, finetune) the same loader draws the augmentation from
(seed, key, view) as precompute would, with view = epoch, and a sample that cannot be decoded is
recorded (shard, key, reason) and skipped, as precompute records it in the unit's marker for a
cached run; either way the epoch's records are in `EpochBatches.skipped`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from attncache.pipeline.augment.mix import draw_and_mix_unit, mix_targets, replay_unit
from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.shards import (DEFAULT_MAX_SAMPLE_BYTES, BadSample, DataError, decode_sample,
    expand_shards, iter_shard, redact)
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.layout import BASE_ARRAYS
from attncache.pipeline.store.meta import StoreError
from attncache.pipeline.store.unit_read import UnitBytes
from attncache.pipeline.train.loader_order import (DEFAULT_INTERLEAVE, epoch_order, rank_units, steps_in_epoch,
    view_of, window_full, window_permutation)
from attncache.pipeline.train.prefetch import Prefetch


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
    shuffle_buffer: int = 256  # a window holds at least this many samples; 0 or 1: no shuffling (tar order)
    with_factors: bool = True
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES  # bigger samples are never read (see pipeline/data/tar.py)
    interleave: int = DEFAULT_INTERLEAVE  # a window holds at least this many units
    prefetch: bool = True  # fetch the next unit's store objects while this one is consumed (pipeline/train/prefetch.py)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_json(list(self.recipe_json))


def match_shards(store: CacheStore, data: tuple[str, ...]) -> tuple[str, ...]:
    """The user's shard URLs in the store's shard order, each bound to its exact shard (URL, else the
    longest path tail only it shares: data may have moved; pipeline/data/binding.py) and refused if
    its size or its members' names and sizes are no longer those the teacher saw."""
    from attncache.pipeline.data.binding import check_store_data

    return tuple(check_store_data(store, data, full=False))


def cache_stream(store: CacheStore, data: tuple[str, ...], num_classes: int, seed: int = 0, views: int | None = None,
                 smoothing: float = 0.0, shuffle_buffer: int = 256, with_factors: bool = True,
                 interleave: int = DEFAULT_INTERLEAVE) -> StreamConfig:
    """The stream of a store's samples: its replayed views of `data` (the shards it was made from,
    bound to them by `match_shards`), one view per epoch (epoch e reads view e mod `views`, the
    store's views when None), with the teacher's factors when `with_factors`."""
    return StreamConfig(match_shards(store, data), tuple(store.meta["recipe"]["ops"]), num_classes, store.path, seed,
                        views or store.meta["views"], smoothing, shuffle_buffer, with_factors=with_factors,
                        interleave=interleave)


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class Sample:
    key: str
    image_CHW: torch.Tensor
    target_C: torch.Tensor
    label: int
    factors: dict[str, np.ndarray]


@dataclass
class DecodedUnit:
    """One unit's usable samples in tar order, and the records of the samples it could not use."""

    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)


def _unit_from_cache(store: CacheStore, shard_index: int, view: int, fetched: UnitBytes | None = None):
    """The unit's arrays and marker, every shard file fetched once (or `fetched` ahead of time),
    checked whole against the marker (sha256) and decoded from the same bytes."""
    fetched = fetched if fetched is not None else store.fetch_unit(view, shard_index)
    marker, problems, data = store.read_checked_unit(fetched)
    where = f"{store.path}: view {view} shard {shard_index:06d}"
    if marker is None:
        raise StoreError(f"{where}: unit not done (no marker); finish the precompute (re-run it to resume)")
    if problems:
        raise CacheCorrupt(f"{where}: {'; '.join(problems)}; run `attncache verify` and re-run the same precompute "
                           "command with --repair")
    return data, marker


def _skip_record(url: str, key: str, reason: str, where: str) -> dict:
    return {"shard": redact(url), "key": key, "reason": reason, "at": where}


def read_unit_samples(cfg: StreamConfig, recipe: Recipe, store: CacheStore | None, shard_index: int,
                      epoch: int, fetched: UnitBytes | None = None) -> DecodedUnit:
    """Every usable sample of one unit, images replayed (cache) or drawn (no cache), in tar order.

    A bad sample without a cache is recorded and skipped (the policy precompute applies); with a
    cache the teacher saw every valid slot, so a slot that no longer decodes means the shard changed.
    `fetched`: the unit's store objects, fetched ahead (`UnitReader`)."""
    url = cfg.shards[shard_index]
    view = view_of(epoch, cfg.views)
    cached, marker = _unit_from_cache(store, shard_index, view, fetched) if store is not None else (None, None)
    skipped = [_skip_record(url, s["key"], s["reason"], "precompute") for s in (marker or {}).get("skipped", [])]
    images, labels, keys = {}, {}, {}
    for entry in iter_shard(url, cfg.max_sample_bytes):
        p = entry.position
        if cached is not None:
            if p >= len(cached.valid):
                raise DataError(f"{url}: has more samples than the cache recorded ({len(cached.valid)} slots)")
            if not cached.valid[p]:
                continue  # skipped at precompute; its record came with the unit's marker
            if str(cached.keys[p]) != entry.key:
                raise DataError(f"{url}: sample at position {p} has key {entry.key!r} but the cache has "
                                f"{str(cached.keys[p])!r}: the shard changed since precompute")
        try:
            image, label = decode_sample(url, entry)
        except BadSample as bad:
            if cached is not None:
                raise DataError(f"{bad}; the teacher used this sample at precompute, so the shard changed "
                                "since: restore it or precompute again") from None
            skipped.append(_skip_record(url, entry.key, bad.reason, "train"))
            continue
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
    return DecodedUnit(samples, skipped)


def draw_unit(recipe: Recipe, images: dict, keys: dict, seed: int, view: int):
    """What precompute would store and the teacher would see, drawn now (no cache): per-sample
    ops from (seed, key, view), then the pair op among the unit's usable samples."""
    aug, base = {}, {}
    for p in sorted(images):
        aug[p], base[p] = recipe.draw_and_apply(images[p], seed, keys[p], view)
    if not recipe.has_pairs or not aug:
        return aug, base
    return draw_and_mix_unit(recipe, seed, view, keys, aug, base)


@dataclass
class _Failed:
    """An error met in a loader worker, carried back so the main process raises it as it was
    (one line for the user) instead of the DataLoader's re-wrapped worker traceback."""

    error: Exception


class UnitReader(torch.utils.data.Dataset):
    """Item i: the rank's i-th unit of the epoch, decoded. Map-style, so the DataLoader returns the
    units in index order whatever the number of workers; each process opens the store once. With a
    cache, reading item i starts fetching the store objects of the item this process reads next
    (i + 1, or i + W in one of W loader workers, which take the items in turn), on a thread."""

    def __init__(self, cfg: StreamConfig, epoch: int, units: list[int]):
        self.cfg, self.epoch, self.units = cfg, epoch, units
        self._store: CacheStore | None = None
        self._prefetch: Prefetch | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.units)

    def _open(self) -> CacheStore | None:
        if self.cfg.cache and self._pid != os.getpid():
            self._store, self._pid = CacheStore.open(self.cfg.cache), os.getpid()
            self._prefetch = Prefetch(self._fetch) if self.cfg.prefetch else None
        return self._store

    def _fetch(self, i: int) -> UnitBytes:
        return self._store.fetch_unit(view_of(self.epoch, self.cfg.views), self.units[i])

    def _fetched(self, i: int) -> UnitBytes | None:
        """Item i's store objects (fetched ahead, or now), after starting the fetch of the next item."""
        if self._prefetch is None:
            return None
        info = torch.utils.data.get_worker_info()
        fetched, following = self._prefetch.take(i), i + (info.num_workers if info else 1)
        if following < len(self.units):
            self._prefetch.ahead(following)
        return fetched

    def __getitem__(self, i: int):
        try:
            store = self._open()
            return read_unit_samples(self.cfg, self.cfg.recipe, store, self.units[i], self.epoch, self._fetched(i))
        except (DataError, StoreError, BadSample, ValueError) as exc:
            if torch.utils.data.get_worker_info() is None:
                raise
            return _Failed(exc)

    def close(self) -> None:
        """Join a fetch still under way (end of the epoch, an error, Ctrl-C)."""
        if self._prefetch is not None:
            self._prefetch.close()


def _as_is(item):
    return item


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


def loader_workers(units: int, workers: int) -> int:
    """Loader processes actually started: never more than the rank has units."""
    return min(workers, max(1, units))


class EpochBatches:
    """The batches of one rank for one epoch, in the order `pipeline/train/loader_order.py` fixes.

    Iterating decodes the units (in `workers` processes, or here with 0), holds one window of
    units at a time plus the units the workers decode ahead, and yields collated batches.
    `skipped` lists the records (shard, key, reason, where) of the samples the units read so far
    could not use; complete once the epoch is exhausted."""

    def __init__(self, cfg: StreamConfig, epoch: int, batch_size: int, workers: int, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.cfg, self.epoch, self.batch_size, self.rank = cfg, epoch, batch_size, rank
        self.units = rank_units(len(cfg.shards), epoch, cfg.seed, rank, world)
        self.workers = loader_workers(len(self.units), max(0, workers))
        self.skipped: list[dict] = []

    def _decoded(self) -> Iterator[DecodedUnit]:
        reader = UnitReader(self.cfg, self.epoch, self.units)
        if not self.units:
            return
        if self.workers == 0:
            try:
                yield from (reader[i] for i in range(len(reader)))
            finally:
                reader.close()
            return
        loader = torch.utils.data.DataLoader(reader, batch_size=None, shuffle=False, num_workers=self.workers,
                                             collate_fn=_as_is, prefetch_factor=2, persistent_workers=False)
        for item in loader:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _windows(self) -> Iterator[list[Sample]]:
        """Each window's samples in unit order, tar order within a unit (no shuffle: one unit each)."""
        shuffle = self.cfg.shuffle_buffer > 1
        interleave, min_samples = (self.cfg.interleave, self.cfg.shuffle_buffer) if shuffle else (1, 0)
        pending: list[Sample] = []
        units = 0
        for index, unit in enumerate(self._decoded()):
            self.skipped += unit.skipped
            pending += unit.samples
            units += 1
            if index + 1 == len(self.units) or window_full(units, len(pending), interleave, min_samples):
                yield pending
                pending, units = [], 0

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        shuffle = self.cfg.shuffle_buffer > 1
        queue: list[Sample] = []
        for window, samples in enumerate(self._windows()):
            if shuffle:
                samples = [samples[i] for i in window_permutation(len(samples), self.cfg.seed, self.epoch,
                                                                  self.rank, window)]
            queue += samples
            while len(queue) >= self.batch_size:
                yield collate(queue[:self.batch_size])
                del queue[:self.batch_size]
        if queue:
            yield collate(queue)


def epoch_loader(cfg: StreamConfig, epoch: int, batch_size: int, workers: int, rank: int = 0,
                 world: int = 1) -> EpochBatches:
    """Batches of one rank for one epoch: the same batches for any `workers` (see `EpochBatches`)."""
    return EpochBatches(cfg, epoch, batch_size, workers, rank, world)
