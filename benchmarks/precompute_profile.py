"""Where precompute time goes, per stage, for one unit of 64 images (workers=0, so every stage is
on the clock of this process).

    .venv/bin/attncache bench precompute-profile [--encoding exact:fp16] [--layers :] [--teacher vit_small_patch16_224]

"teacher forward+capture" runs the teacher up to the last cached layer's attention only (precompute
stops the forward there): with the default layers (all but the last 3) it is less than a full forward.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from attncache.benchmarks import HelpFormatter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--teacher", default="vit_small_patch16_224", help="timm teacher (random init, seeded)")
    parser.add_argument("--encoding", default="exact:fp16", help="encoding spec")
    parser.add_argument("--compression", default=None,
                        help="compressor of the factor arrays (default: the encoding's own, as precompute's)")
    parser.add_argument("--layers", default=None, help="layers to cache (default: precompute's, all but the last 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="teacher batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    # the pipeline (torch, timm, Zarr) after the arguments, so `--help` answers at once
    from attncache.pipeline.precompute.job import PrecomputeConfig, build_job
    from attncache.pipeline.precompute.units import UnitAccumulator, prepare_unit
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset
    from attncache.pipeline.teacher.model import TeacherConfig

    work = Path(tempfile.mkdtemp(prefix="attncache-prof-"))
    try:
        info = synth_dataset(work / "d", 64, 1, config=SynthConfig(image_size=64, num_classes=4), shard_size=64, seed=0)
        job = build_job(PrecomputeConfig(data=(info["train"],), out=str(work / "c.zarr"),
                                         teacher=TeacherConfig(args.teacher, random_init=True), views=1,
                                         encoding=args.encoding, compression=args.compression, layers=args.layers,
                                         batch_size=args.batch_size, workers=0,
                                         threads=args.threads, progress=False))
        unit = job.store.units()[0]
        acc = UnitAccumulator(job, unit)
        spent = {"decode+augment": 0.0, "teacher forward+capture": 0.0, "encode": 0.0, "write+checksum": 0.0}
        batches = prepare_unit(unit, job.recipe, 0, args.batch_size)
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            spent["decode+augment"] += time.perf_counter() - t
            if batch is None:
                break
            t = time.perf_counter()
            q, k = job.teacher.capture(batch.images_BCHW, job.layers, job.heads) if batch.keys else (None, None)
            spent["teacher forward+capture"] += time.perf_counter() - t
            t = time.perf_counter()
            acc.add(batch, q, k)
            spent["encode"] += time.perf_counter() - t
            if batch.last:
                t = time.perf_counter()
                acc.write(batch.count)
                spent["write+checksum"] += time.perf_counter() - t
        total = sum(spent.values())
        print(f"{args.teacher} {args.encoding} {args.compression} layers {list(job.layers)} batch {args.batch_size}, "
              f"64 images, {args.threads} threads")
        for name, seconds in spent.items():
            print(f"  {name:>24}: {seconds:6.2f} s  {100 * seconds / total:5.1f} %")
        print(f"  {'total':>24}: {total:6.2f} s  ({64 / total:.1f} images/s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
