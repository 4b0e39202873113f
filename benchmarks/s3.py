"""Object stores: requests per unit written and read, and train steps/s from S3 against local disk.

    .venv/bin/python -m attncache.benchmarks.s3 [--shards 8] [--shard-size 32] [--steps 30] [--json out.json]

Starts moto's S3 server on 127.0.0.1 (benchmarks/s3server.py, as the tests do; needs the `test`
extra), uploads synthetic shards to a bucket and counts the requests the server logs:

- written: precompute of `--shards` shards against the same job on half of them, both to S3; the
  difference over the extra units is what one unit costs, free of the job's fixed cost (metadata,
  lease, probe);
- read: one epoch of the training loader over the S3 store and S3 shards (factors included), per
  unit, store open included;
- steps/s: `pipeline.train.loop.train` (distill from the cache, what `attncache train` runs) with
  cache and shards on S3 against the same cache and shards on local disk, interleaved `--rounds`
  times, fastest kept. The server is on this machine, so this is the cost of the protocol and the
  client, not of a network's latency.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from attncache.benchmarks import HelpFormatter
from attncache.benchmarks.s3server import S3Server

SHAPE = {"img_size": 32, "patch_size": 4, "depth": 6, "num_heads": 4, "embed_dim": 96}


def requests_during(server: S3Server, run) -> tuple[object, Counter]:
    before = len(server.requests())
    result = run()
    return result, Counter(r.method for r in server.requests()[before:])


def precompute(data: str, out: str, threads: int):
    from attncache.pipeline.encodings.spec import DEFAULT_ENCODING
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute
    from attncache.pipeline.teacher.model import TeacherConfig

    teacher = TeacherConfig("vit_tiny_patch16_224", tuple(sorted(dict(SHAPE, num_classes=4).items())),
                            random_init=True, seed=0)
    return run_precompute(PrecomputeConfig(data=(data,), out=out, teacher=teacher, views=1, encoding=DEFAULT_ENCODING,
                                           batch_size=32, workers=0, threads=threads, progress=False))


def read_epoch(cache: str, data: str) -> int:
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.train.loader import StreamConfig, epoch_loader, match_shards

    store = CacheStore.open(cache)
    stream = StreamConfig(match_shards(store, (data,)), tuple(store.meta["recipe"]["ops"]), 4, store.path, 0,
                          store.meta["views"], 0.0, 256, with_factors=True)
    return sum(len(b["key"]) for b in epoch_loader(stream, 0, 32, 0))


def steps_per_s(cache: str, data: str, out: Path, args) -> float:
    from attncache.pipeline.train.loop import TrainConfig, train
    from attncache.pipeline.train.optim import OptimConfig
    from attncache.pipeline.train.session import TransferSpec
    from attncache.pipeline.train.student import StudentConfig

    student = StudentConfig("vit_tiny_patch16_224", tuple(sorted(SHAPE.items())), 4, 0.0, 0)
    spec = TransferSpec(student, "distill", "0:3", cache=cache)
    result = train(TrainConfig(data=(data,), out=str(out), spec=spec, max_steps=args.steps, batch_size=args.batch_size,
                               workers=args.workers, threads=args.threads, progress=False, checkpoint_every=10 ** 9,
                               log_every=10 ** 9, optim=OptimConfig(warmup_epochs=0.0)))
    shutil.rmtree(out)
    return result.steps / result.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attncache.benchmarks.s3", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="shards (= units, one view)")
    parser.add_argument("--shard-size", type=int, default=32, help="images per shard")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per training run")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the training runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of S3 and local (fastest kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    import fsspec

    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = S3Server(tmp / "requests.log").start()
    try:
        server.activate()
        bucket = server.make_bucket("bench")
        info = synth_dataset(tmp / "data", num_train=args.shards * args.shard_size, num_val=0, shard_size=args.shard_size,
                             config=SynthConfig(image_size=32, num_classes=4), seed=0)
        fs = fsspec.filesystem("s3")
        tars = sorted((tmp / "data").glob("train-*.tar"))
        for tar in tars:
            fs.pipe_file(f"{bucket}/{tar.name}", tar.read_bytes())
        half = args.shards // 2
        last = f"{args.shards - 1:06d}"
        s3_data, local_data = f"{bucket}/train-{{000000..{last}}}.tar", info["train"]
        _, small = requests_during(server, lambda: precompute(f"{bucket}/train-{{000000..{half - 1:06d}}}.tar",
                                                              f"{bucket}/half.zarr", args.threads))
        _, full = requests_during(server, lambda: precompute(s3_data, f"{bucket}/cache.zarr", args.threads))
        precompute(local_data, str(tmp / "cache.zarr"), args.threads)
        extra = args.shards - half
        written = {m: (full[m] - small[m]) / extra for m in sorted(full)}
        samples, read = requests_during(server, lambda: read_epoch(f"{bucket}/cache.zarr", s3_data))
        rates: dict[str, list[float]] = {"s3": [], "local": []}
        for r in range(args.rounds):
            rates["s3"].append(steps_per_s(f"{bucket}/cache.zarr", s3_data, tmp / f"run-s3-{r}", args))
            rates["local"].append(steps_per_s(str(tmp / "cache.zarr"), local_data, tmp / f"run-local-{r}", args))
            print(f"round {r}: s3 {rates['s3'][-1]:.2f} steps/s, local {rates['local'][-1]:.2f} steps/s", flush=True)
        report = {"units": args.shards, "samples_per_unit": args.shard_size,
                  "requests_per_unit_written": {"total": sum(written.values()), **written},
                  "requests_job_written": {"total": sum(full.values()), **dict(sorted(full.items()))},
                  "requests_per_unit_read": {"total": sum(read.values()) / args.shards,
                                             **{m: n / args.shards for m, n in sorted(read.items())}},
                  "samples_read": samples, "steps": args.steps, "batch_size": args.batch_size,
                  "workers": args.workers, "steps_per_s": {k: max(v) for k, v in rates.items()}, "all_rounds": rates,
                  "s3_over_local": max(rates["s3"]) / max(rates["local"])}
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
