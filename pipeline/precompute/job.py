"""Precompute: run the teacher once per (sample, view) and write the unit's factors to the store.

Work is split into units = (input shard, view). CPU work (tar reading, decoding, drawing and
applying augmentation) runs in loader workers, one unit per worker at a time; the main process
runs the teacher and the encoding, and a writer thread writes a unit when its last batch is in.
`process_unit` does the same for one unit alone (the function a
Ray task calls). A unit's bytes depend only on the job's settings and the unit: batches never
cross units and always start at the unit's start.
"""
from __future__ import annotations

import enum
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from attncache.pipeline._util.runtime import default_threads
from attncache.pipeline.augment.recipe import Recipe, parse_recipe
from attncache.pipeline.data.shards import (DEFAULT_MAX_SAMPLE_BYTES, BadSample, DatasetManifest, build_manifest,
    check_max_sample_bytes, decode_sample, expand_shards, iter_shard, redact)
from attncache.pipeline.encodings.core import attention_kl, exact_logits
from attncache.pipeline.encodings.spec import DEFAULT_ENCODING, Encoding, parse_encoding
from attncache.pipeline.encodings.finite import (NonFiniteFactors, NonFiniteValues, check_encoded, nonfinite_message,
    require_finite)
from attncache.pipeline.augment.mix import draw_and_mix_unit
from attncache.pipeline.store.lease import DEFAULT_LEASE_TIMEOUT_S, Lease, LeaseConfig
from attncache.pipeline.data.binding import (check_digests, check_members, check_sizes, match_urls, members_sha256,
    shard_sha256)
from attncache.pipeline.store.cache import CacheStore, Unit, base_arrays, factor_arrays, parse_compression
from attncache.pipeline.teacher.model import Teacher, TeacherConfig, resolve_heads, resolve_layers


class OnBadSample(enum.Enum):
    FAIL = "fail"
    SKIP = "skip"


class TooManySkipped(RuntimeError):
    pass


@dataclass(frozen=True)
class PrecomputeConfig:
    data: tuple[str, ...]
    out: str
    teacher: TeacherConfig
    views: int = 1
    seed: int = 0
    recipe: str = "train"
    layers: str = ":"
    heads: str | None = None
    encoding: str = DEFAULT_ENCODING
    compression: str = "zstd:3"
    batch_size: int = 64
    workers: int = 2
    threads: int = field(default_factory=default_threads)
    on_bad_sample: OnBadSample = OnBadSample.SKIP
    max_skipped: int | None = None
    progress: bool = True
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S  # seconds without a heartbeat before the store's lease is free
    repair: bool = False  # re-check every done unit byte by byte, rewrite failing ones; restore lost metadata
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES  # bigger samples are recorded and skipped, never read


@dataclass(frozen=True)
class Job:
    """Everything resolved once before any unit runs: the checks that fail before work happen here."""

    config: PrecomputeConfig
    manifest: DatasetManifest
    teacher: Teacher
    recipe: Recipe
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    encoding: Encoding
    store: CacheStore


@dataclass(frozen=True)
class PreparedBatch:
    unit: Unit
    positions: np.ndarray  # [b] positions within the shard
    keys: list[str]
    labels: np.ndarray  # [b]
    images_BCHW: torch.Tensor
    aug_BP: np.ndarray  # [b, P]
    skipped: list[dict]  # bad samples met since the previous batch of this unit
    last: bool
    count: int  # entries seen in the shard so far (the shard's total on the last batch)


@dataclass
class Summary:
    units_total: int = 0
    units_already_done: int = 0
    units_processed: int = 0
    samples_written: int = 0
    skipped: list[dict] = field(default_factory=list)
    factor_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        per = self.factor_bytes / self.samples_written if self.samples_written else 0
        out = list(self.notes)
        out += [f"units: {self.units_processed} processed, {self.units_already_done} already done, "
               f"{self.units_total} in the job",
               f"samples written: {self.samples_written}   skipped: {len(self.skipped)}",
               f"factor bytes written: {self.factor_bytes:,} ({per:,.0f} per sample-view)",
               f"time: {self.seconds:.1f} s   throughput: {self.images_per_s:.1f} images/s"]
        out += [f"  skipped ({n}): {reason}" for reason, n in reasons.most_common()]
        out += [f"    {redact(s['shard'])}: {s['key']!r}: {s['reason']}" for s in self.skipped[:20]]
        return out


# ---------------------------------------------------------------------------------------------- job


def build_metadata(config: PrecomputeConfig, manifest: DatasetManifest, teacher: Teacher, recipe: Recipe,
                   layers, heads, encoding: Encoding) -> dict:
    slots = max(1, manifest.max_count)
    arrays = base_arrays(recipe.num_params)
    arrays.update(factor_arrays(encoding, len(layers), len(heads), teacher.num_tokens, teacher.head_dim))
    return {
        "created_by": "attncache 0.1.0",
        "teacher": teacher.identity(),
        "recipe": {"spec": recipe.describe(), "ops": recipe.to_json(), "num_params": recipe.num_params,
                   "layout": recipe.param_layout(), "output_size": recipe.output_size},
        "seed": config.seed, "views": config.views, "layers": list(layers), "heads": list(heads),
        "tokens": {"count": teacher.num_tokens, "num_prefix_tokens": teacher.num_prefix_tokens,
                   "grid": list(teacher.grid)},
        "encoding": encoding.to_json(),
        "compression": parse_compression(config.compression),
        "dataset": dict(manifest.to_json(), fingerprint=manifest.fingerprint, slots_per_shard=slots,
                        num_slots=slots * len(manifest.shards)),
        "compute": {"batch_size": config.batch_size, "threads": config.threads, "device": config.teacher.device,
                    "torch_version": torch.__version__},
        "arrays": arrays,
    }


def build_job(config: PrecomputeConfig, manifest: DatasetManifest | None = None, teacher: Teacher | None = None) -> Job:
    """Resolve and check everything, then create or reopen the store. Workers of a distributed
    run pass the driver's manifest instead of scanning every shard again; a runner that loaded
    (and self-checked) the teacher before touching --out passes it in."""
    if config.views < 1:
        raise ValueError("--views must be at least 1")
    check_max_sample_bytes(config.max_sample_bytes)
    torch.set_num_threads(config.threads)
    if manifest is None:
        manifest = build_manifest(expand_shards(list(config.data)), progress=config.progress,
                                  max_sample_bytes=config.max_sample_bytes)
    teacher = teacher or Teacher(config.teacher)
    defaults = teacher.recipe_defaults()
    recipe = parse_recipe(config.recipe, defaults)
    if recipe.output_size != defaults.image_size:
        raise ValueError(f"recipe output size {recipe.output_size} != teacher input size {defaults.image_size}")
    layers = resolve_layers(config.layers, teacher.num_layers)
    heads = resolve_heads(config.heads, teacher.num_heads)
    encoding = parse_encoding(config.encoding)
    meta = build_metadata(config, manifest, teacher, recipe, layers, heads, encoding)
    store = CacheStore.create_or_open(config.out, meta, repair=config.repair)
    return Job(config, manifest, teacher, recipe, layers, heads, encoding, store)


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


def job_units(job: Job) -> list[Unit]:
    """The store's units with the shard URLs as given to this run (the metadata holds them with
    credentials redacted, and the data may have moved since the store was made), each bound to its
    exact shard (pipeline/data/binding.py), whose size must still be the one the store recorded."""
    shards = job.store.meta["dataset"]["shards"]
    urls = match_urls([s["url"] for s in shards], [s.url for s in job.manifest.shards], redact(job.store.path))
    check_sizes(shards, urls, redact(job.store.path))
    return [Unit(u.view, u.shard_index, urls[u.shard_index]) for u in job.store.units()]


def units_to_do(job: Job, units: list[Unit]) -> list[Unit]:
    """Units that are not done: no marker, or a marker its files do not agree with (sizes; with
    --repair every byte, and the shard the unit was made from must still hash to what it recorded)."""
    todo = [u for u in units if not job.store.unit_done(u, full=job.config.repair)]
    pending = set(todo)
    markers = [(u, job.store.read_marker(u.view, u.shard_index)) for u in units if u not in pending]
    where = redact(job.store.path)  # a shard changed since its units were made cannot be resumed or repaired
    check_members([(u.shard_index, m["shard_members_sha256"], u.url) for u, m in markers], where)
    if job.config.repair:
        check_digests([(u.shard_index, m["shard_sha256"], u.url) for u, m in markers], where)
    return todo


def job_notes(job: Job, lease: Lease) -> list[str]:
    """Lines the summary starts with: a lease taken over, keys that more than one shard holds
    (each is cached in its own unit; nothing is dropped, but a key no longer names one sample)."""
    notes = [] if lease.took_over is None else [f"took over the lease of a dead or stalled precompute ({lease.took_over})"]
    dups = job.manifest.duplicate_keys_across_shards
    if dups:
        notes.append(f"warning: {len(dups)}{'+' if len(dups) >= 100 else ''} keys appear in more than one shard "
                     f"(each copy is cached in its own unit): {', '.join(map(repr, dups[:5]))}")
    return notes


def _guarded(batches: Iterator[PreparedBatch], lease: Lease) -> Iterator[PreparedBatch]:
    """Stop before a unit is handed to the writer if another job has taken the store's lease."""
    for batch in batches:
        if batch.last:
            lease.check()
        yield batch


def run_precompute(config: PrecomputeConfig, job: Job | None = None) -> Summary:
    """The in-process runner (`--ray none`): loader workers decode, this process runs the teacher.
    The store's lease (pipeline/store/lease.py) is held from before the store is created to the end."""
    teacher = None if job else Teacher(config.teacher)  # a teacher that cannot load is refused before --out exists
    with Lease(config.out, LeaseConfig(config.lease_timeout)) as lease:
        return _run_in_process(config, job or build_job(config, teacher=teacher), lease)


def _run_in_process(config: PrecomputeConfig, job: Job, lease: Lease) -> Summary:
    units = job_units(job)
    todo = units_to_do(job, units)
    summary = Summary(units_total=len(units), units_already_done=len(units) - len(todo), notes=job_notes(job, lease))
    started = time.perf_counter()
    counts = [s.count for s in job.manifest.shards]
    workers = min(config.workers, len(todo))
    stream = UnitStream(todo, job.recipe, config.seed, config.batch_size, config.max_sample_bytes)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    with tqdm(total=sum(counts[u.shard_index] for u in todo), unit="img", disable=not config.progress,
              desc="precompute", dynamic_ncols=True) as bar:
        consume(job, _guarded(iter(loader), lease) if todo else iter(()), summary, bar)
    summary.seconds = time.perf_counter() - started
    return summary
