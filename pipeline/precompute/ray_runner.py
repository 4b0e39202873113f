"""Precompute as a Ray job: teacher workers as actors, units dispatched with bounded in-flight.

The driver builds the job once (manifest scan, store creation, every check that fails before
work), then actors, each holding one teacher, run `process_unit` on units the driver hands out.
Actors set the same intra-op thread count as `--ray none`, so the bytes are identical.

Retries are Ray's own actor-task retries (`max_task_retries` with a `retry_exceptions` allowlist):
an actor that dies is restarted and its in-flight units re-run, as often as it takes; a unit whose
attempt raised is re-run by Ray up to `max_retries` times and then reported as failed; a refusal
that no retry can change (`REFUSALS`) is outside the allowlist, so it is never retried and stops the
job at once. At-least-once is harmless: `write_unit` rewrites a unit whole and its marker last.
Ray keeps one retry counter for deaths and raised errors alike, and a task sent to an actor that is
still restarting fails at once and spends a retry (a bounded counter ran out within one restart in
tests/test_ray.py's killed-worker test), so deaths get Ray's unbounded count and the actor itself
bounds raised errors: it counts each unit's failures and, once `max_retries` are spent, raises a
class outside the allowlist (`RetriesSpent`).
Dispatch stays a short `ray.wait` loop rather than `ray.util.ActorPool`: the pool's unordered
results do not say which unit a failed task carried (the failure line must name it), and the pool
drops an actor whose task ended in `ActorDiedError` although `max_restarts` brings it back.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass

from tqdm.auto import tqdm

from attncache.pipeline.data.shards import redact
from attncache.pipeline.encodings.finite import NonFiniteFactors
from attncache.pipeline.precompute.job import (PrecomputeConfig, Summary, TooManySkipped, build_job, data_shards,
    job_notes, job_units, units_to_do)
from attncache.pipeline.precompute.units import process_unit
from attncache.pipeline.store.layout import Unit
from attncache.pipeline.store.grow import settle
from attncache.pipeline.store.lease import Lease, LeaseConfig
from attncache.pipeline.teacher.model import Teacher


# the teacher's values do not fit --encoding: every retry and every unit meets the same, so the job
# is refused at once in the worker's one line (as under --ray none) instead of retried and wrapped in
# UnitsFailed. Units in flight are cut off whole (a marker is written last).
REFUSALS = (NonFiniteFactors,)


class UnitAttemptFailed(RuntimeError):
    """One attempt at a unit raised something a retry may cure: the one class in Ray's
    `retry_exceptions` allowlist, since an allowlist cannot say "all but REFUSALS". It carries the
    cause as one line, so it pickles back to the driver whatever the cause held."""


class RetriesSpent(RuntimeError):
    """A unit raised once more after `max_retries` re-runs: outside the allowlist, so Ray hands it back."""


class UnitsFailed(RuntimeError):
    """Some units still failed after their retries; the message names each unit and its error."""


class ClusterTooSmall(RuntimeError):
    """No node can host a teacher worker of the asked shape; Ray would wait for one forever."""


@dataclass(frozen=True)
class RayOptions:
    address: str = "local"  # "local" starts Ray here; anything else joins that cluster
    num_workers: int | None = None  # default: one per `cpus_per_worker` CPUs (or per GPU)
    cpus_per_worker: float | None = None  # default: the job's intra-op thread count (no oversubscription)
    gpus_per_worker: float = 0.0
    max_retries: int = 2
    object_store_memory: int = 256 * 1024 * 1024


class UnitWorker:
    """One teacher, loaded once; runs whole units."""

    def __init__(self, config: PrecomputeConfig, manifest_json: dict, max_retries: int):
        from attncache.pipeline.data.shards import DatasetManifest

        self.job = build_job(config, DatasetManifest.from_json(manifest_json))
        self.max_retries = max_retries
        self.failures: Counter[Unit] = Counter()  # raised attempts per unit (Ray re-runs a task on its actor)

    def process(self, unit: Unit) -> Summary:
        return process_unit(self.job, unit)

    def run(self, unit: Unit) -> Summary:
        """The task the driver submits: `process` with its failures sorted for Ray's retry allowlist."""
        try:
            return self.process(unit)
        except REFUSALS:
            raise  # outside the retry allowlist: the driver refuses the job in this error's words
        except Exception as exc:  # noqa: BLE001 - any other failure may pass on a retry
            self.failures[unit] += 1
            retry = self.failures[unit] <= self.max_retries
            raise (UnitAttemptFailed if retry else RetriesSpent)(f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _connect(options: RayOptions):
    import ray

    if options.address == "local":
        _init_loopback(ray, options)
    else:
        ray.init(address=options.address, log_to_driver=False, ignore_reinit_error=True)
    return ray


def _init_loopback(ray, options: RayOptions) -> None:
    """A one-machine Ray whose servers listen on 127.0.0.1 only, with no dashboard.

    `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: Ray 2.60 replaces a loopback
    address by the machine's address unless its cluster support is off (the flag that
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` sets), and then GCS, raylet and workers listen on every
    interface (found by tests/reliability/test_security.py). The flag is turned off for this
    call only, so a later `ray start` in the same process still forms clusters."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=os.cpu_count(), num_gpus=None, include_dashboard=False, log_to_driver=False,
                 object_store_memory=options.object_store_memory, _node_ip_address="127.0.0.1",
                 ignore_reinit_error=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _worker_count(ray, options: RayOptions) -> int:
    """Workers that fit; refuses up front a worker shape no node can host (it would wait forever)."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if options.cpus_per_worker > largest:
        raise ClusterTooSmall(f"each teacher worker needs {options.cpus_per_worker:g} CPUs (--cpus-per-worker, default "
                         f"--threads) but the largest Ray node has {largest:g}: lower --threads or --cpus-per-worker")
    if options.num_workers:
        return options.num_workers
    resources = ray.cluster_resources()
    if options.gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // options.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // options.cpus_per_worker))


def run_precompute_ray(config: PrecomputeConfig, options: RayOptions, worker: type = UnitWorker) -> Summary:
    """The driver holds the store's lease (pipeline/store/lease.py) for the whole job; actors never take it.
    `worker` is the actor class: `UnitWorker`, or a subclass that wraps its `process` (tests inject faults so)."""
    shards = data_shards(config)  # a --data pattern that matches nothing is refused before any work
    teacher = Teacher(config.teacher)  # a teacher that cannot load is refused before --out exists
    with Lease(config.out, LeaseConfig(config.lease_timeout)) as lease:
        return _run(config, options, lease, teacher, worker, shards)


def _run(config: PrecomputeConfig, options: RayOptions, lease: Lease, teacher: Teacher | None = None,
         worker: type = UnitWorker, shards: list[str] | None = None) -> Summary:
    job = build_job(config, teacher=teacher, shards=shards)
    units = job_units(job)
    todo = units_to_do(job, units)
    summary = Summary(units_total=len(units), units_already_done=len(units) - len(todo), notes=job_notes(job, lease))
    if not todo:
        settle(job.store)  # a grow killed before its last step (pipeline/store/grow.py)
        return summary
    if options.cpus_per_worker is None:
        options = dataclasses.replace(options, cpus_per_worker=float(config.threads))
    ray = _connect(options)
    started = time.perf_counter()
    try:
        actor = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                           max_restarts=-1)(worker)
        worker_config = dataclasses.replace(config, progress=False)
        manifest_json = job.manifest.to_json()
        count = min(_worker_count(ray, options), len(todo))
        workers = [actor.remote(worker_config, manifest_json, options.max_retries) for _ in range(count)]
        failures = _dispatch(ray, workers, todo, summary, config.progress, config.max_skipped, lease.check)
    finally:
        ray.shutdown()
    summary.seconds = time.perf_counter() - started
    if failures:
        lines = [f"  {unit.name}: {error}" for unit, error in failures]
        raise UnitsFailed(f"{len(failures)} unit(s) failed after {options.max_retries} retries:\n" + "\n".join(lines))
    settle(job.store)  # a grow's root metadata and older markers, written last (pipeline/store/grow.py)
    return summary


def _dispatch(ray, workers, todo: list[Unit], summary: Summary, progress: bool, max_skipped: int | None,
              check_lease=lambda: None):
    """Two units in flight per worker: the next one is queued while the current one runs. Each task
    carries its own retries (Ray re-runs it on the same actor, restarted if it died), so a result
    here is final. The lease is checked before each dispatch: a driver whose store was taken over
    stops handing out units."""
    pending = list(reversed(todo))
    in_flight: dict = {}
    failures = []
    idle = [w for w in workers for _ in range(2)]
    with tqdm(total=len(todo), unit="unit", desc="precompute (ray)", disable=not progress) as bar:
        while pending or in_flight:
            while pending and idle:
                check_lease()
                worker, unit = idle.pop(), pending.pop()
                run = worker.run.options(max_task_retries=-1, retry_exceptions=[UnitAttemptFailed])
                in_flight[run.remote(unit)] = (worker, unit)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            worker, unit = in_flight.pop(done[0])
            idle.append(worker)
            try:
                result: Summary = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - Ray's retries are spent: the unit is reported
                cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError carries the worker's exception
                if isinstance(cause, REFUSALS):
                    raise cause from None  # never retried: refuse the job now, in its own words
                line = str(cause) if isinstance(cause, RetriesSpent) else f"{type(exc).__name__}: {_first_line(exc)}"
                failures.append((unit, line))
                continue
            summary.units_processed += 1
            summary.samples_written += result.samples_written
            summary.factor_bytes += result.factor_bytes
            summary.skipped += result.skipped
            if max_skipped is not None and len(summary.skipped) > max_skipped:
                last = summary.skipped[-1]
                raise TooManySkipped(f"{len(summary.skipped)} samples skipped, more than --max-skipped {max_skipped}; "
                                     f"latest: {redact(last['shard'])}: {last['key']!r}: {last['reason']}")
            bar.update(1)
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(images=summary.samples_written, img_per_s=f"{summary.samples_written / elapsed:.1f}")
    return failures
