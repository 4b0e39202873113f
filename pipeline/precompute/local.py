"""The in-process runner (`--ray none`): loader workers decode, this process runs the teacher, the store's
lease held throughout."""
from __future__ import annotations

import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from attncache.pipeline.precompute.job import (PrecomputeConfig, Job, PreparedBatch, Summary, build_job, data_shards,
    job_units, units_to_do, job_notes)
from attncache.pipeline.precompute.units import UnitStream, consume
from attncache.pipeline.store.grow import settle
from attncache.pipeline.store.lease import Lease, LeaseConfig
from attncache.pipeline.teacher.model import Teacher


def _guarded(batches: Iterator[PreparedBatch], lease: Lease) -> Iterator[PreparedBatch]:
    """Stop before a unit is handed to the writer if another job has taken the store's lease."""
    for batch in batches:
        if batch.last:
            lease.check()
        yield batch


def run_precompute(config: PrecomputeConfig, job: Job | None = None) -> Summary:
    """The in-process runner (`--ray none`): loader workers decode, this process runs the teacher.
    The store's lease (pipeline/store/lease.py) is held from before the store is created to the end."""
    shards = None if job else data_shards(config)  # a --data pattern that matches nothing is refused before any work
    teacher = None if job else Teacher(config.teacher)  # a teacher that cannot load is refused before --out exists
    with Lease(config.out, LeaseConfig(config.lease_timeout)) as lease:
        return _run_in_process(config, job or build_job(config, teacher=teacher, shards=shards), lease)


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
    settle(job.store)  # a grow's root metadata and older markers, written last (pipeline/store/grow.py)
    summary.seconds = time.perf_counter() - started
    return summary
