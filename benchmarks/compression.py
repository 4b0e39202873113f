"""Which compressor pays for itself, per encoding: bytes saved against precompute seconds spent.

    .venv/bin/attncache bench compression [--teacher vit_small_patch16_224] [--samples 32] [--json]

The teacher's Q/K (random init, seeded, or a trained teacher's directory; default layers) are
captured for `--samples` synthetic images and encoded with each encoding; each factor array's unit
shard is then encoded exactly as the store writes it (store/shard_bytes.py: the store's chunks,
shard and codecs, into the parts it writes), once per compressor, best of `--repeats`. Every time
is CPU seconds of this process (all its threads: the codecs', torch's), so a machine shared with
other jobs moves the figures less than wall time would.
Reported per (encoding, compressor): gain (raw bytes / stored bytes), encode MB per CPU second of
raw bytes, and the two fractions the rule weighs, both per sample-view:

    saved   = 1 - stored bytes / stored bytes without compression
    cost    = (encode CPU s - encode CPU s without compression) / teacher capture CPU s

The rule: a compressor pays for itself when `saved - cost > 0`, i.e. the share of bytes it saves
beats the share of precompute time it adds (on these 2 cores the writer thread's CPU time is taken
from the forward, so its seconds are the precompute's); the default is the compressor with the
largest `saved - cost`, `none` when none is above 0. The teacher capture time is the floor a
precompute costs, so `cost` is the largest share a compressor can take; a faster teacher (a GPU)
makes every `cost` larger. `lz4` is measured for reference only: the store's format has no lz4.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from attncache.benchmarks import HelpFormatter

ENCODINGS = ("exact:fp16", "exact:bf16", "lowrank:r=8:int8", "lowrank:r=8:int4", "lowrank:r=8:fp8", "lowrank:r=8:fp16")
COMPRESSORS = ("none", "zstd:1", "zstd:3", "zstd:1:shuffle", "zstd:3:shuffle", "zstd:1:shuffle:block=256K",
               "zstd:1:shuffle:block=1M", "zstd:3:shuffle:block=1M", "lz4", "lz4:shuffle")


def codecs_of(spec: str):
    """zarr codecs of a compressor name: the store's own grammar, plus blosc lz4 for reference."""
    from zarr.codecs import BloscCodec

    from attncache.pipeline.store import layout

    if spec.startswith("lz4"):
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle" if spec.endswith(":shuffle") else "noshuffle")
    return layout.compressors(layout.parse_compression(spec))


def shard_seconds_and_bytes(arrays: dict, compressor: str, repeats: int) -> tuple[float, int]:
    """CPU seconds (best of `repeats`, summed over arrays) and bytes of every array's one shard file."""
    import zarr

    from attncache.pipeline.store.layout import factor_chunk_slots
    from attncache.pipeline.store.shard_bytes import encode_shard_parts, parts_size

    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    seconds, size = 0.0, 0
    for name, block in arrays.items():
        trailing = block.shape[1:]
        array = group.create_array(name, shape=block.shape, dtype=block.dtype, fill_value=0,
                                   chunks=(factor_chunk_slots(len(block)), *trailing), shards=block.shape,
                                   compressors=codecs_of(compressor))
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            parts = encode_shard_parts(array, "/".join(["c"] + ["0"] * block.ndim), 0, len(block), block, False)
            best = min(best, time.process_time() - started)
        seconds, size = seconds + best, size + parts_size(parts)
    return seconds, size


def measure(encoding_spec: str, cap, capture_s_per_sample: float, repeats: int,
            compressors: tuple[str, ...] = COMPRESSORS) -> list[dict]:
    from attncache.pipeline.encodings.spec import parse_encoding

    encoding = parse_encoding(encoding_spec)
    arrays = encoding.encode(cap.q, cap.k, cap.scale)
    n = len(cap.q)
    raw = sum(a.nbytes for a in arrays.values())
    rows = []
    for compressor in compressors:
        seconds, size = shard_seconds_and_bytes(arrays, compressor, repeats)
        rows.append({"encoding": encoding_spec, "compressor": compressor, "raw_bytes_per_sample": raw / n,
                     "bytes_per_sample": size / n, "gain": raw / size, "encode_mb_s": raw / 1e6 / seconds,
                     "seconds_per_sample": seconds / n})
    base = rows[0]
    for row in rows:
        row["saved"] = 1 - row["bytes_per_sample"] / base["bytes_per_sample"]
        row["cost"] = (row["seconds_per_sample"] - base["seconds_per_sample"]) / capture_s_per_sample
        row["net"] = row["saved"] - row["cost"]
        extra = row["seconds_per_sample"] - base["seconds_per_sample"]
        saved_bytes = base["bytes_per_sample"] - row["bytes_per_sample"]
        row["saved_mb_per_cpu_s"] = saved_bytes / 1e6 / extra if extra > 0 else None
    return rows


def choose(rows: list[dict]) -> str:
    """The rule of the module docstring, over the store's own compressors (not lz4)."""
    eligible = [r for r in rows if not r["compressor"].startswith("lz4") and r["net"] > 0]
    return max(eligible, key=lambda r: r["net"])["compressor"] if eligible else "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--teacher", default="vit_small_patch16_224",
                        help="timm teacher (random init, seeded), or a trained teacher's directory (config.json and "
                             "weights, e.g. teacher_d64's OUT/teacher64)")
    parser.add_argument("--samples", type=int, default=32, help="images captured (one unit shard of this many slots)")
    parser.add_argument("--layers", default=None, help="layers (default: precompute's, all but the last 3)")
    parser.add_argument("--encodings", default=" ".join(ENCODINGS), help="encodings, space separated")
    parser.add_argument("--compressors", default=" ".join(COMPRESSORS),
                        help="compressors, space separated ('none', the baseline of saved and cost, is always measured)")
    parser.add_argument("--repeats", type=int, default=3, help="encodes per measurement (the best counts)")
    parser.add_argument("--batch-size", type=int, default=16, help="teacher batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = parser.parse_args(argv)
    import torch

    from attncache.pipeline.augment.recipe import parse_recipe
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset
    from attncache.pipeline.teacher.model import Teacher, TeacherConfig
    from attncache.pipeline.teacher.selection import resolve_heads, resolve_layers_or_default
    from attncache.pipeline.tools.fidelity import capture, replayed_images

    compressors = ("none", *[c for c in args.compressors.split() if c != "none"])  # "none" is the baseline
    for spec in compressors:
        try:
            codecs_of(spec)  # a bad name is refused before the teacher runs
        except ValueError as exc:
            parser.error(f"--compressors: {exc}")
    torch.set_num_threads(args.threads)
    teacher = Teacher(TeacherConfig(args.teacher, random_init=not Path(args.teacher).is_dir()))
    layers = resolve_layers_or_default(args.layers, teacher.num_layers)
    heads = resolve_heads(None, teacher.num_heads)
    with tempfile.TemporaryDirectory(prefix="attncache-compression-") as work:
        info = synth_dataset(Path(work) / "d", args.samples, 1, config=SynthConfig(image_size=64, num_classes=4),
                             shard_size=args.samples, seed=0)
        recipe = parse_recipe("eval", teacher.recipe_defaults())
        images, keys = replayed_images((info["train"],), recipe, 0, args.samples)
    capture(teacher, images[:args.batch_size], layers, heads, args.batch_size, keys)  # warm-up
    started = time.process_time()
    cap = capture(teacher, images, layers, heads, args.batch_size, keys)
    capture_s = (time.process_time() - started) / len(images)
    rows = [row for spec in args.encodings.split() for row in measure(spec, cap, capture_s, args.repeats, compressors)]
    chosen = {spec: choose([r for r in rows if r["encoding"] == spec]) for spec in args.encodings.split()}
    report = {"teacher": args.teacher, "layers": list(layers), "samples": len(images), "threads": args.threads,
              "capture_s_per_sample": capture_s, "rows": rows, "chosen": chosen}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.teacher} (random init) layers {list(layers)}, {len(images)} samples, {args.threads} threads; "
          f"teacher capture {capture_s * 1e3:.0f} CPU ms per sample")
    print(f"{'encoding':>18} {'compressor':>15} {'bytes/sample':>13} {'gain':>6} {'MB/cpu-s':>8} {'saved':>7} "
          f"{'cost':>7} {'net':>7} {'MB saved/cpu-s':>14}")
    for r in rows:
        per_s = "" if r["saved_mb_per_cpu_s"] is None else f"{r['saved_mb_per_cpu_s']:.1f}"
        print(f"{r['encoding']:>18} {r['compressor']:>15} {r['bytes_per_sample']:>13,.0f} {r['gain']:>6.3f} "
              f"{r['encode_mb_s']:>8.0f} {100 * r['saved']:>6.1f}% {100 * r['cost']:>6.1f}% {100 * r['net']:>6.1f}% "
              f"{per_s:>14}")
    for spec, compressor in chosen.items():
        print(f"  {spec}: {compressor}")


if __name__ == "__main__":
    main()
