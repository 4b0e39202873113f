"""Precompute throughput against the bare teacher, and where the bytes go, measured in one run.

    .venv/bin/attncache bench precompute [--teacher vit_small_patch16_224] [--images 256] [--batch-size 32] [--json]

Reports (1) images/s of the bare *full* teacher forward (`forward_features` on ready tensors, every
block, the final norm) and of the whole precompute (tar read, decode, augment, teacher, encode,
write) at the same batch size and threads, as ratios, for the default encoding and exact:fp16, each
with the default layers (all but the last 3, where the teacher's forward stops) and with every layer
(`--layers :`); (2) bytes per sample-view on disk for several encodings and compressors (every
layer) against raw fp32 attention maps. The bare forward is measured before every precompute run
and after the last; ratios divide by the median of those, and all of them are reported, since this
machine's speed drifts within a run. The teacher is randomly initialised (no downloads here), which
leaves throughput unchanged; its attention is flatter than a trained teacher's, which matters for
fidelity, not for the byte counts of fixed-size encodings.

--json prints one JSON object on stdout and nothing else (a PATH after it also writes it there).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attncache.benchmarks import HelpFormatter
from attncache.pipeline._util.runtime import keep_freed_memory

from attncache.pipeline.encodings.spec import DEFAULT_ENCODING
from attncache.pipeline.precompute.job import PrecomputeConfig, build_job
from attncache.pipeline.precompute.local import run_precompute
from attncache.pipeline.store.checks import inspect_store
from attncache.pipeline.store.layout import compression_spec
from attncache.pipeline.studies.synth import SynthConfig, synth_dataset
from attncache.pipeline.teacher.model import Teacher, TeacherConfig, parse_model_args

# (JSON key suffix, encoding, layers): None is precompute's default (all but the last 3)
THROUGHPUT_RUNS = (("default", DEFAULT_ENCODING, None), ("all_layers", DEFAULT_ENCODING, ":"),
                   ("default_exact_fp16", "exact:fp16", None), ("all_layers_exact_fp16", "exact:fp16", ":"))
SIZE_RUNS = (("exact:fp32", "none"), ("exact:fp16", "none"), ("exact:fp16", "zstd:3"), ("exact:fp16", "zstd:9:shuffle"),
             ("exact:bf16", "zstd:3"), ("lowrank:r=16:fp16", "zstd:3"), ("lowrank:r=16:int8", "none"),
             ("lowrank:r=16:int8", "zstd:3"), ("lowrank:r=8:int8", "zstd:3"))


def bare_forward_rate(teacher: Teacher, batch_size: int, batches: int) -> float:
    """The full forward (every block and the final norm), as a user running the teacher online pays it."""
    size = teacher.recipe_defaults().image_size
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        teacher.model.forward_features(x)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            teacher.model.forward_features(x)
    return batch_size * batches / (time.perf_counter() - started)


def precompute_rate(data: str, out: Path, teacher_cfg: TeacherConfig, encoding: str, compression: str | None,
                    batch_size: int, workers: int, threads: int, layers: str | None) -> tuple[float, dict]:
    config = PrecomputeConfig(data=(data,), out=str(out), teacher=teacher_cfg, views=1, encoding=encoding,
                              compression=compression, batch_size=batch_size, workers=workers, threads=threads,
                              progress=False, layers=layers)
    job = build_job(config)  # teacher load and data scan are set-up, not throughput
    summary = run_precompute(config, job)
    return summary.images_per_s, inspect_store(str(out))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--teacher", default="vit_small_patch16_224", help="timm teacher (random init, seeded)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                        help="timm keyword argument for the teacher, e.g. depth=4 (repeatable)")
    parser.add_argument("--images", type=int, default=256, help="synthetic 64 px images to precompute")
    parser.add_argument("--batch-size", type=int, default=32, help="teacher batch size")
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--no-sizes", action="store_true", help="skip the bytes-per-encoding table")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="print one JSON object on stdout and nothing else; with PATH also write it there")
    return parser


def measure_throughput(args, work: Path, info: dict, teacher_cfg: TeacherConfig, teacher: Teacher) -> dict:
    """Each precompute run, with a bare-forward measurement before it and one after the last."""
    batches = max(2, args.images // args.batch_size)
    bare, rows = [], []
    for suffix, encoding, layers in THROUGHPUT_RUNS:
        bare.append(bare_forward_rate(teacher, args.batch_size, batches))
        rate, stats = precompute_rate(info["train"], work / f"{suffix}.zarr", teacher_cfg, encoding, None,
                                      args.batch_size, args.workers, args.threads, layers)  # the encoding's compressor
        rows.append({"run": suffix, "encoding": encoding, "compression": compression_spec(stats["compression"]), "layers": stats["layers"],
                     "images_per_s": rate, "bytes_per_sample": stats["bytes_per_sample"]})
    bare.append(bare_forward_rate(teacher, args.batch_size, batches))
    median = statistics.median(bare)
    out = {"bare_forward_images_per_s": median, "bare_forward_images_per_s_each": bare}
    for row in rows:
        row["ratio_to_bare_forward"] = row["images_per_s"] / median
        out[f"images_per_s_{row['run']}"] = row["images_per_s"]
        out[f"ratio_{row['run']}"] = row["ratio_to_bare_forward"]
    out["throughput"] = rows
    return out


def measure_sizes(args, work: Path, teacher_cfg: TeacherConfig) -> list[dict]:
    small = synth_dataset(work / "small", num_train=64, num_val=1, config=SynthConfig(image_size=64, num_classes=4),
                          shard_size=64, seed=1)
    rows = []
    for encoding, compression in SIZE_RUNS:
        _, stats = precompute_rate(small["train"], work / f"s-{encoding}-{compression}.zarr", teacher_cfg, encoding,
                                   compression, args.batch_size, args.workers, args.threads, ":")
        rows.append({"encoding": encoding, "compression": compression, "bytes_per_sample": stats["bytes_per_sample"],
                     "x_smaller_than_fp32_maps": stats["ratio_to_raw_fp32_maps"]})
    return rows


def _print_tables(result: dict) -> None:
    bare = result["bare_forward_images_per_s_each"]
    print(f"bare full teacher forward: median {result['bare_forward_images_per_s']:.1f} images/s "
          f"(each: {', '.join(f'{b:.1f}' for b in bare)})")
    for r in result["throughput"]:
        layers = f"layers {r['layers'][0]}..{r['layers'][-1]}" if len(r["layers"]) > 1 else f"layers {r['layers']}"
        print(f"precompute {r['encoding']:>18} {layers:>14}: {r['images_per_s']:.1f} images/s = "
              f"{r['ratio_to_bare_forward']:.2f} x bare forward")
    if result["sizes"]:
        print(f"\n{'encoding':>20} {'compression':>16} {'bytes/sample':>14} {'x smaller than fp32 maps':>26}")
    for r in result["sizes"]:
        print(f"{r['encoding']:>20} {r['compression']:>16} {r['bytes_per_sample']:>14,.0f} "
              f"{r['x_smaller_than_fp32_maps']:>26.1f}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # before the first bare forward: both sides of every ratio run with it
    work = Path(tempfile.mkdtemp(prefix="attncache-bench-"))
    try:
        info = synth_dataset(work / "data", num_train=args.images, num_val=1,
                             config=SynthConfig(image_size=64, num_classes=4), shard_size=64, seed=0)
        teacher_cfg = TeacherConfig(args.teacher, parse_model_args(args.model_arg), random_init=True, seed=0)
        teacher = Teacher(teacher_cfg)
        result = {"teacher": args.teacher, "model_args": dict(teacher_cfg.model_args), "tokens": teacher.num_tokens,
                  "layers": teacher.num_layers, "heads": teacher.num_heads, "head_dim": teacher.head_dim,
                  "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
                  "images": args.images, "default_encoding": DEFAULT_ENCODING, "malloc_keeps_freed_memory": kept}
        result.update(measure_throughput(args, work, info, teacher_cfg, teacher))
        result["sizes"] = [] if args.no_sizes else measure_sizes(args, work, teacher_cfg)
        if args.json is None:
            _print_tables(result)
        else:
            print(json.dumps(result))
            if args.json != "-":
                Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
