"""Precompute throughput against the bare teacher, and where the bytes go, measured in one run.

    .venv/bin/attncache bench precompute [--teacher vit_small_patch16_224] [--images 256] [--batch-size 32]

Reports (1) images/s of the bare teacher forward (`forward_features` on ready tensors) and of the
whole precompute (tar read, decode, augment, teacher, encode, write) at the same batch size, as a
ratio; (2) bytes per sample-view on disk for several encodings and compressors against raw fp32
attention maps. The teacher is randomly initialised (no downloads here), which leaves throughput
unchanged; its attention is flatter than a trained teacher's, which matters for fidelity, not for
the byte counts of fixed-size encodings.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from attncache.benchmarks import HelpFormatter

from attncache.pipeline.encodings.spec import DEFAULT_ENCODING
from attncache.pipeline.precompute.job import PrecomputeConfig, build_job
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.store.checks import inspect_store
from attncache.pipeline.studies.synth import SynthConfig, synth_dataset
from attncache.pipeline.teacher.model import Teacher, TeacherConfig


def bare_forward_rate(teacher: Teacher, batch_size: int, batches: int) -> float:
    size = teacher.recipe_defaults().image_size
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        teacher.model.forward_features(x)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            teacher.model.forward_features(x)
    return batch_size * batches / (time.perf_counter() - started)


def precompute_rate(data: str, out: Path, teacher_cfg: TeacherConfig, encoding: str, compression: str,
                    batch_size: int, workers: int, threads: int) -> tuple[float, dict]:
    config = PrecomputeConfig(data=(data,), out=str(out), teacher=teacher_cfg, views=1, encoding=encoding,
                              compression=compression, batch_size=batch_size, workers=workers, threads=threads,
                              progress=False)
    job = build_job(config)  # teacher load and data scan are set-up, not throughput
    summary = run_precompute(config, job)
    return summary.images_per_s, inspect_store(str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--teacher", default="vit_small_patch16_224", help="timm teacher (random init, seeded)")
    parser.add_argument("--images", type=int, default=256, help="synthetic 64 px images to precompute")
    parser.add_argument("--batch-size", type=int, default=32, help="teacher batch size")
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="attncache-bench-"))
    try:
        info = synth_dataset(work / "data", num_train=args.images, num_val=1, config=SynthConfig(image_size=64, num_classes=4), shard_size=64, seed=0)
        teacher_cfg = TeacherConfig(args.teacher, random_init=True, seed=0)
        teacher = Teacher(teacher_cfg)
        batches = max(2, args.images // args.batch_size)
        rows = []
        bare = bare_forward_rate(teacher, args.batch_size, batches)
        for encoding, compression in [("exact:fp16", "zstd:3"), ("lowrank:r=16:int8", "zstd:3"),
                                      (DEFAULT_ENCODING, "zstd:3")]:
            rate, stats = precompute_rate(info["train"], work / f"{encoding}.zarr", teacher_cfg, encoding,
                                          compression, args.batch_size, args.workers, args.threads)
            rows.append({"encoding": encoding, "compression": compression, "images_per_s": rate,
                         "ratio_to_bare_forward": rate / bare, "bytes_per_sample": stats["bytes_per_sample"],
                         "raw_fp32_map_bytes": stats["raw_fp32_map_bytes_per_sample"],
                         "x_smaller_than_fp32_maps": stats["ratio_to_raw_fp32_maps"]})
        bare_again = bare_forward_rate(teacher, args.batch_size, batches)
        size_rows = []
        small = synth_dataset(work / "small", num_train=64, num_val=1, config=SynthConfig(image_size=64, num_classes=4), shard_size=64, seed=1)
        for encoding, compression in [("exact:fp32", "none"), ("exact:fp16", "none"), ("exact:fp16", "zstd:3"),
                                      ("exact:fp16", "zstd:9:shuffle"), ("exact:bf16", "zstd:3"),
                                      ("lowrank:r=16:fp16", "zstd:3"), ("lowrank:r=16:int8", "none"),
                                      ("lowrank:r=16:int8", "zstd:3"), ("lowrank:r=8:int8", "zstd:3")]:
            _, stats = precompute_rate(small["train"], work / f"s-{encoding}-{compression}.zarr", teacher_cfg,
                                       encoding, compression, args.batch_size, args.workers, args.threads)
            size_rows.append({"encoding": encoding, "compression": compression,
                              "bytes_per_sample": stats["bytes_per_sample"],
                              "x_smaller_than_fp32_maps": stats["ratio_to_raw_fp32_maps"]})
        result = {"teacher": args.teacher, "tokens": teacher.num_tokens, "layers": teacher.num_layers,
                  "heads": teacher.num_heads, "head_dim": teacher.head_dim, "batch_size": args.batch_size,
                  "threads": args.threads, "workers": args.workers, "images": args.images,
                  "bare_forward_images_per_s": [bare, bare_again], "throughput": rows, "sizes": size_rows}
        print(json.dumps(result, indent=1))
        print(f"\nbare teacher forward: {bare:.1f} / {bare_again:.1f} images/s (before / after)")
        for r in rows:
            print(f"precompute {r['encoding']:>20}: {r['images_per_s']:.1f} images/s = "
                  f"{r['ratio_to_bare_forward']:.2f} x bare forward")
        print(f"\n{'encoding':>20} {'compression':>16} {'bytes/sample':>14} {'x smaller than fp32 maps':>26}")
        for r in size_rows:
            print(f"{r['encoding']:>20} {r['compression']:>16} {r['bytes_per_sample']:>14,.0f} "
                  f"{r['x_smaller_than_fp32_maps']:>26.1f}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
