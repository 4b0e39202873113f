"""`attncache demo`: the whole cache job end to end on the embedded data and a tiny teacher."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from pipeline.synth import synth_dataset
from pipeline.precompute import PrecomputeConfig, run_precompute
from pipeline.teacher import TeacherConfig
from pipeline.verify import inspect_store, verify_store

DEMO_TEACHER = TeacherConfig("vit_tiny_patch16_224", (("depth", 6), ("img_size", 32), ("patch_size", 4)),
                             random_init=True, seed=0)


@click.command()
@click.option("--out", default="demo_out", type=click.Path(file_okay=False), help="Working directory (recreated).")
@click.option("--quick", is_flag=True, help="A smaller run for CI (fewer samples, one view).")
def demo(out, quick):
    """Synthesise data, precompute a cache with a tiny random-init ViT, verify, inspect, draw attention.

    Until teacher pre-training lands the teacher is randomly initialised (seeded), so its attention
    is flatter than a trained teacher's.
    """
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    n_train = 256 if quick else 1024
    info = synth_dataset(out / "data", num_train=n_train, num_val=64, image_size=32, shard_size=128, seed=0)
    click.echo(f"[1/4] synthetic data: {json.dumps(info)}")
    config = PrecomputeConfig(data=(info["train"],), out=str(out / "cache.zarr"), teacher=DEMO_TEACHER,
                              views=1 if quick else 2, encoding="lowrank:r=8:int8", batch_size=64, workers=2)
    summary = run_precompute(config)
    click.echo("[2/4] precompute:\n  " + "\n  ".join(summary.lines()))
    report = verify_store(config.out)
    click.echo(f"[3/4] verify: {report.units_ok}/{report.units_total} units ok, problems: {report.problems or 'none'}")
    stats = inspect_store(config.out)
    click.echo(f"[4/4] inspect: {stats['bytes_per_sample']:.0f} bytes per sample-view, "
               f"{stats['ratio_to_raw_fp32_maps']:.1f}x smaller than fp32 attention maps")
    from pipeline.show import render
    from pipeline.store import CacheStore
    store = CacheStore.open(config.out)
    key = str(store.group["views/0/key"][0])
    png = render(store, key, 0, store.meta["layers"][:: max(1, len(store.meta["layers"]) // 3)], None, "cls",
                 str(out / "attention.png"))
    click.echo(f"attention maps of {key!r}: {png}")
    click.echo(f"demo finished in {time.perf_counter() - started:.1f} s")
    if not report.ok:
        raise SystemExit(1)
