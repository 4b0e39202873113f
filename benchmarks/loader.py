"""Images/s one loader worker delivers: decode + replay (RandAugment, Mixup/CutMix) + factor reads.

    .venv/bin/attncache bench loader [--sizes 32,224] [--images 2048,512] [--batch-size 128] [--json out.json]

A GPU student is fed by loader workers; this measures what one of them delivers, so that the
number a GPU needs is (images/s of the GPU step) / (images/s of one worker). Per image size it
builds a synthetic split (PNG shards), precomputes a cache with `--recipe train_mix` (RandAugment
+ random erasing + Mixup/CutMix, replayed by the loader) and the default encoding, from a
random-init teacher with ViT-B/16's attention geometry (12 layers, 12 heads, patch 16 at 224 px /
patch 4 at 32 px) but a narrow width: the factor bytes a worker reads depend on layers, heads and
tokens only, not on the width, and a narrow teacher keeps the precompute short. Then it times
`epoch_loader` (the trainer's loader) over the epoch:

- `worker`: 1 loader process (what a training rank gets per --workers), batches as delivered;
- `inline`: the same work in this process (no process hop), the worker's own compute;
- `no_factors`: inline without reading factors (decode + replay only), to split the cost.

Each is timed over the whole epoch (shards of 64 images), `--rounds` times, the fastest kept.
Single-threaded torch, as a DataLoader worker runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from attncache.benchmarks import HelpFormatter

# torch and the pipeline are imported in the functions that use them, so `--help` answers at once


def teacher_cfg(size: int) -> TeacherConfig:
    from attncache.pipeline.teacher.model import TeacherConfig

    args = {"img_size": size, "patch_size": 16 if size >= 128 else 4, "depth": 12, "num_heads": 12,
            "embed_dim": 192, "num_classes": 4}
    return TeacherConfig("vit_tiny_patch16_224", tuple(sorted(args.items())), random_init=True, seed=0)


def stream_of(cache: Path, data: str) -> StreamConfig:
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.train.loader import StreamConfig, match_shards

    store = CacheStore.open(cache)
    return StreamConfig(match_shards(store, (data,)), tuple(store.meta["recipe"]["ops"]), 4, store.path, 0,
                        store.meta["views"], 0.1, 256, with_factors=True)


def timed_epoch(stream: StreamConfig, batch_size: int, workers: int) -> dict:
    """Images/s over a whole epoch, from creating the loader to its last batch (a worker's start
    included: a trainer pays it every epoch)."""
    from attncache.pipeline.train.loader import epoch_loader

    images, factor_bytes = 0, 0
    started = time.perf_counter()
    for batch in epoch_loader(stream, 0, batch_size, workers):
        images += len(batch["key"])
        factor_bytes = sum(a.numel() * a.element_size() for a in batch["factors"].values()) // len(batch["key"])
    seconds = time.perf_counter() - started
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds,
            "factor_bytes_per_image": factor_bytes}


def measure(size: int, images: int, args, tmp: Path) -> dict:
    import torch

    from attncache.pipeline.encodings.spec import DEFAULT_ENCODING
    from attncache.pipeline.precompute.job import PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp / f"data{size}", num_train=images, num_val=0, shard_size=64,
                         config=SynthConfig(image_size=size, num_classes=4), seed=0)
    cache = tmp / f"cache{size}.zarr"
    run_precompute(PrecomputeConfig(data=(info["train"],), out=str(cache), teacher=teacher_cfg(size), views=1,
                                    recipe="train_mix", encoding=DEFAULT_ENCODING, batch_size=32, workers=1,
                                    threads=args.threads, progress=False))
    stream = stream_of(cache, info["train"])
    torch.set_num_threads(1)  # as a DataLoader worker runs
    runs = {"worker": (stream, 1), "inline": (stream, 0), "no_factors": (replace(stream, with_factors=False), 0)}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, (s, workers) in runs.items():
            got = timed_epoch(s, args.batch_size, workers)
            if name not in best or got["images_per_s"] > best[name]["images_per_s"]:
                best[name] = got
    return {"image_size": size, "encoding": DEFAULT_ENCODING, "recipe": "train_mix",
            **{name: {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for name, r in best.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem}", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sizes", default="32,224", help="image sizes (px), comma list")
    parser.add_argument("--images", default="2048,512", help="images per size, comma list")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch")
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs per variant (fastest kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the precompute (not timed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.images.split(",")]
    if len(counts) != len(sizes):
        parser.error("--images: give one count per --sizes entry")
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        report = []
        for size, n in zip(sizes, counts):
            result = measure(size, n, args, tmp)
            report.append(result)
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
