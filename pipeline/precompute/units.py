"""One unit of precompute, start to finish: its samples read, augmented and batched (in loader workers),
then the teacher and the encoding, accumulated and written as one unit (on a writer thread).

A unit's bytes depend only on the job's settings and the unit: batches never cross units and always
start at the unit's start. `process_unit` is the function a Ray task calls.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, NamedTuple

import numpy as np
import torch

from attncache.pipeline.augment.mix import draw_and_mix_unit
from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.binding import members_sha256, shard_sha256
from attncache.pipeline.data.shards import DEFAULT_MAX_SAMPLE_BYTES, BadSample, decode_sample, iter_shard, redact
from attncache.pipeline.encodings.kl import attention_kl, exact_logits
from attncache.pipeline.encodings.finite import (NonFiniteFactors, NonFiniteValues, check_encoded, nonfinite_message,
    require_finite)
from attncache.pipeline.precompute.job import OnBadSample, TooManySkipped, Job, PreparedBatch, Summary
from attncache.pipeline.store.layout import Unit


# ---------------------------------------------------------------------------------------------- CPU side


class _Entry(NamedTuple):
    """One tar entry of a unit: a usable sample or the record of a bad one."""

    count: int  # entries of the shard seen up to and including this one
    skip: dict | None  # the bad sample's record, else None
    sample: tuple | None  # (position, key, label, pixels [3, S, S], params [P]), else None


def _augmented(unit: Unit, recipe: Recipe, seed: int, max_sample_bytes: int) -> Iterator[_Entry]:
    count = 0
    for entry in iter_shard(unit.url, max_sample_bytes):
        count += 1
        try:
            image, label = decode_sample(unit.url, entry)
        except BadSample as bad:
            yield _Entry(count, {"position": entry.position, "key": entry.key, "reason": bad.reason,
                                 "shard": unit.url}, None)
            continue
        params, pixels = recipe.draw_and_apply(image, seed, entry.key, unit.view)
        yield _Entry(count, None, (entry.position, entry.key, label, pixels, params))


def _mixed(unit: Unit, recipe: Recipe, seed: int, entries: list[_Entry]) -> list[_Entry]:
    """The unit's usable samples mixed with partners drawn among them only (a skipped sample is
    never a partner), through pipeline/augment/mix.py's `draw_and_mix_unit`, which the cache-less trainer uses too."""
    usable = [e.sample for e in entries if e.sample is not None]
    if not usable:
        return entries
    aug, pixels = draw_and_mix_unit(recipe, seed, unit.view, {s[0]: s[1] for s in usable},
                                    {s[0]: s[4] for s in usable}, {s[0]: s[3] for s in usable})
    return [e if e.sample is None else e._replace(sample=(*e.sample[:3], pixels[e.sample[0]], aug[e.sample[0]]))
            for e in entries]


def _batches(unit: Unit, entries: Iterator[_Entry], batch_size: int, num_params: int) -> Iterator[PreparedBatch]:
    """Chunks of `batch_size` usable samples in tar order; skip records ride with the next batch."""
    buf: list[tuple] = []
    skipped: list[dict] = []
    count = 0

    def flush(last: bool) -> PreparedBatch:
        nonlocal buf, skipped
        batch = PreparedBatch(
            unit=unit, positions=np.array([b[0] for b in buf], dtype=np.int64), keys=[b[1] for b in buf],
            labels=np.array([b[2] for b in buf], dtype=np.int64),
            images_BCHW=torch.stack([b[3] for b in buf]) if buf else torch.empty(0),
            aug_BP=np.stack([b[4] for b in buf]) if buf else np.zeros((0, num_params)),
            skipped=skipped, last=last, count=count)
        buf, skipped = [], []
        return batch

    for entry in entries:
        count = entry.count
        if entry.skip is not None:
            skipped.append(entry.skip)
            continue
        buf.append(entry.sample)
        if len(buf) == batch_size:
            yield flush(last=False)
    yield flush(last=True)


def prepare_unit(unit: Unit, recipe: Recipe, seed: int, batch_size: int,
                 max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[PreparedBatch]:
    """Decode and augment one shard for one view; bad samples become records, never exceptions.

    With a pair op (`mix`, recipe.has_pairs) any usable sample may be any other's partner, so the
    whole unit is decoded and augmented before the first batch is yielded: one unit of images is
    held per loader worker, count x 3 x S x S x 4 bytes, twice that while mixing (a 1000-sample
    shard at 224 px: 0.6 GB, 1.2 GB peak). Batches keep the boundaries they have without a pair op."""
    entries = _augmented(unit, recipe, seed, max_sample_bytes)
    if recipe.has_pairs:
        entries = iter(_mixed(unit, recipe, seed, list(entries)))
    yield from _batches(unit, entries, batch_size, recipe.num_params)


class UnitStream(torch.utils.data.IterableDataset):
    """Units split over loader workers by index; each worker streams its units' batches in order."""

    def __init__(self, units: list[Unit], recipe: Recipe, seed: int, batch_size: int,
                 max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES):
        self.units, self.recipe, self.seed, self.batch_size = units, recipe, seed, batch_size
        self.max_sample_bytes = max_sample_bytes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            yield from prepare_unit(unit, self.recipe, self.seed, self.batch_size, self.max_sample_bytes)


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run a generator ahead on a thread (PIL and numpy release the GIL while decoding)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def run():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)

    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# ---------------------------------------------------------------------------------------------- teacher side


class UnitAccumulator:
    """Collects one unit's encoded batches into whole-shard blocks, then writes them."""

    def __init__(self, job: Job, unit: Unit):
        self.job, self.unit = job, unit
        spp = job.store.slots_per_shard
        arrays = job.store.meta["arrays"]
        self.blocks = {n: np.zeros((spp, *s["trailing_shape"]), dtype=s["dtype"])
                       for n, s in arrays.items() if n not in ("key", "label", "valid")}  # aug + factors
        self.keys = [""] * spp
        self.labels = np.full(spp, -1, dtype=np.int64)
        self.valid = np.zeros(spp, dtype=np.uint8)
        self.skipped: list[dict] = []
        self.fidelity: list[float] | None = None
        self.started = time.perf_counter()

    def add(self, batch: PreparedBatch, q_BLHNd: torch.Tensor | None, k_BLHNd: torch.Tensor | None) -> int:
        """Encode one batch's captured Q/K into the unit's blocks; returns samples added."""
        self.skipped += batch.skipped
        if not batch.keys:
            return 0
        scale = self.job.teacher.scale
        encoded = self._encode_finite(batch, q_BLHNd, k_BLHNd, scale)
        if self.fidelity is None:  # what the encoding loses, measured on the unit's first sample
            est = self.job.encoding.decode_logits({n: a[:1] for n, a in encoded.items()}, scale, q_BLHNd.device)
            self.fidelity = attention_kl(exact_logits(q_BLHNd[:1], k_BLHNd[:1], scale), est).tolist()
        pos = batch.positions
        for name, values in encoded.items():
            self.blocks[name][pos] = values
        self.blocks["aug"][pos, :batch.aug_BP.shape[1]] = batch.aug_BP
        for p, key in zip(pos, batch.keys):
            self.keys[p] = key
        self.labels[pos] = batch.labels
        self.valid[pos] = 1
        return len(batch.keys)

    def _encode_finite(self, batch: PreparedBatch, q_BLHNd: torch.Tensor, k_BLHNd: torch.Tensor, scale: float) -> dict:
        """The encoding of a batch whose Q/K and encoded arrays are all finite (pipeline/encodings/finite.py).
        A non-finite value refuses the job whatever --on-bad-sample says: the remedy is another
        encoding (or another teacher), not skipping samples; nothing of the unit is written."""
        try:
            require_finite("the teacher's Q", q_BLHNd)
            require_finite("the teacher's K", k_BLHNd)
            encoded = self.job.encoding.encode(q_BLHNd, k_BLHNd, scale)
            check_encoded(encoded)
            return encoded
        except NonFiniteValues as bad:
            raise NonFiniteFactors(nonfinite_message(bad, batch.unit.url, batch.keys[bad.sample],
                                                     self.job.layers[bad.layer], self.job.encoding.spec)) from None

    def write(self, count: int) -> dict:
        aug = self.blocks.pop("aug")
        return self.job.store.write_unit(
            self.unit, count=count, keys=self.keys, labels=self.labels, valid=self.valid, aug=aug,
            factors=self.blocks, skipped=[{k: s[k] for k in ("position", "key", "reason")} for s in self.skipped],
            fidelity_kl=self.fidelity, seconds=time.perf_counter() - self.started,
            shard=(shard_sha256(self.unit.url), members_sha256(self.unit.url)))


def _check_policy(job: Job, batch: PreparedBatch, summary: Summary) -> None:
    for s in batch.skipped:
        if job.config.on_bad_sample is OnBadSample.FAIL:
            raise BadSample(s["shard"], s["key"], s["reason"])
    summary.skipped += batch.skipped
    limit = job.config.max_skipped
    if limit is not None and len(summary.skipped) > limit:
        last = summary.skipped[-1]
        raise TooManySkipped(f"{len(summary.skipped)} samples skipped, more than --max-skipped {limit}; "
                             f"latest: {redact(last['shard'])}: {last['key']!r}: {last['reason']}")


def consume(job: Job, batches: Iterator[PreparedBatch], summary: Summary, bar=None) -> None:
    """Teacher forward and encoding in this thread; each finished unit is written on a writer
    thread while the next unit's forwards run. Batches of several units may interleave (one per
    loader worker); each unit has its own accumulator.

    Encoding stays in this thread on purpose: on a thread beside the forward, two torch parallel
    regions oversubscribe the cores (measured 2.5x slower on 2 cores). Writing is mostly memory
    copies, compression and I/O, which overlap well; at most one write is in flight, so at most
    two units' blocks are held in memory."""
    open_units: dict[tuple[int, int], UnitAccumulator] = {}
    in_flight: Future | None = None

    def written(future: Future) -> None:
        unit, unit_bytes = future.result()
        summary.units_processed += 1
        summary.factor_bytes += unit_bytes

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="attncache-write") as writer:
        for batch in batches:
            uid = (batch.unit.view, batch.unit.shard_index)
            acc = open_units.get(uid) or open_units.setdefault(uid, UnitAccumulator(job, batch.unit))
            _check_policy(job, batch, summary)
            q = k = None
            if batch.keys:
                q, k = job.teacher.capture(batch.images_BCHW, job.layers, job.heads)
            summary.samples_written += acc.add(batch, q, k)
            if batch.last:
                del open_units[uid]
                if in_flight is not None:
                    written(in_flight)
                in_flight = writer.submit(_write_unit, acc, batch.count)
            if bar is not None:
                bar.update(len(batch.keys) + len(batch.skipped))
                bar.set_postfix(units=f"{summary.units_processed}/{summary.units_total - summary.units_already_done}")
        if in_flight is not None:
            written(in_flight)


def _write_unit(acc: UnitAccumulator, count: int) -> tuple[Unit, int]:
    acc.write(count)
    return acc.unit, acc.job.store.unit_factor_bytes(acc.unit)


def process_unit(job: Job, unit: Unit) -> Summary:
    """One unit start to finish (what a Ray task runs); decoding runs ahead on a thread."""
    summary = Summary(units_total=1)
    started = time.perf_counter()
    consume(job, _prefetch(prepare_unit(unit, job.recipe, job.config.seed, job.config.batch_size,
                                        job.config.max_sample_bytes)), summary)
    summary.seconds = time.perf_counter() - started
    return summary
