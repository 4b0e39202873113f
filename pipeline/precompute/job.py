"""Precompute: run the teacher once per (sample, view) and write the unit's factors to the store.

Work is split into units = (input shard, view). This module builds a job (settings, checks before any
work, the store's metadata) and says which units are left; precompute/units.py runs one unit, and
precompute/local.py (`--ray none`) or precompute/ray_runner.py (`--ray`) runs them all. CPU work (tar
reading, decoding, drawing and applying augmentation) runs in loader workers, one unit per worker at a
time; the main process runs the teacher and the encoding, and a writer thread writes a unit when its
last batch is in.
"""
from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from attncache.pipeline._util.runtime import default_threads, keep_freed_memory
from attncache.pipeline.augment.recipe import Recipe, parse_recipe
from attncache.pipeline.data.binding import check_digests, check_members, check_sizes, match_urls
from attncache.pipeline.data.shards import (DEFAULT_MAX_SAMPLE_BYTES, DatasetManifest, build_manifest,
    check_max_sample_bytes, expand_shards, redact)
from attncache.pipeline.encodings.spec import DEFAULT_ENCODING, Encoding, parse_encoding
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.layout import Unit, base_arrays, factor_arrays, parse_compression
from attncache.pipeline.store.lease import DEFAULT_LEASE_TIMEOUT_S, Lease
from attncache.pipeline.teacher.model import Teacher, TeacherConfig, resolve_heads, resolve_layers_or_default


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
    layers: str | None = None  # None: the layers a default student transfers, all but the last 3 (`0:-3`)
    heads: str | None = None
    encoding: str = DEFAULT_ENCODING
    compression: str | None = None  # None: the encoding's own (`Encoding.default_compression`)
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
        "compression": parse_compression(encoding.compression(config.compression)),
        "dataset": dict(manifest.to_json(), fingerprint=manifest.fingerprint, slots_per_shard=slots,
                        num_slots=slots * len(manifest.shards)),
        "compute": {"batch_size": config.batch_size, "threads": config.threads, "device": config.teacher.device,
                    "torch_version": torch.__version__},
        "arrays": arrays,
    }


def data_shards(config: PrecomputeConfig) -> list[str]:
    """--data expanded to shard URLs (pipeline/data/patterns.py; a glob on an object store is a
    listing): a runner calls this once, before any work, so that a pattern matching nothing is
    refused before the teacher loads or --out is touched, and hands the URLs on to `build_job`."""
    return expand_shards(list(config.data))


def build_job(config: PrecomputeConfig, manifest: DatasetManifest | None = None, teacher: Teacher | None = None,
              shards: list[str] | None = None) -> Job:
    """Resolve and check everything, then create or reopen the store. Workers of a distributed
    run pass the driver's manifest instead of scanning every shard again; a runner that loaded
    (and self-checked) the teacher before touching --out passes it in, and the shard URLs it
    expanded (`data_shards`; expanded here when not given)."""
    if config.views < 1:
        raise ValueError("--views must be at least 1")
    check_max_sample_bytes(config.max_sample_bytes)
    torch.set_num_threads(config.threads)
    keep_freed_memory()
    if manifest is None:
        manifest = build_manifest(data_shards(config) if shards is None else shards, progress=config.progress,
                                  max_sample_bytes=config.max_sample_bytes)
    teacher = teacher or Teacher(config.teacher)
    defaults = teacher.recipe_defaults()
    recipe = parse_recipe(config.recipe, defaults)
    if recipe.output_size != defaults.image_size:
        raise ValueError(f"recipe output size {recipe.output_size} != teacher input size {defaults.image_size}")
    layers = resolve_layers_or_default(config.layers, teacher.num_layers)
    heads = resolve_heads(config.heads, teacher.num_heads)
    encoding = parse_encoding(config.encoding)
    meta = build_metadata(config, manifest, teacher, recipe, layers, heads, encoding)
    store = CacheStore.create_or_open(config.out, meta, repair=config.repair)
    return Job(config, manifest, teacher, recipe, layers, heads, encoding, store)


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
