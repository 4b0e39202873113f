"""`attncache data synth|pack`: write webdataset shards to precompute from."""
from __future__ import annotations

import click

from attncache.cli import defaults
from attncache.cli import params as P


@click.group()
def data():
    """Make webdataset tar shards: the embedded synthetic set, or your own image folder."""


def _synth_defaults() -> defaults.Synth:
    return defaults.Synth()


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--num-train", default=2048, type=P.ints(1, 10**8), show_default=True, help="Labelled training images.")
@click.option("--num-val", default=512, type=P.ints(0, 10**8), show_default=True, help="Labelled validation images.")
@click.option("--num-pool", default=0, type=P.ints(0, 10**8), show_default=True, help="Unlabelled images for MAE pre-training (pool-*.tar).")
@click.option("--num-shifted", default=0, type=P.ints(0, 10**8), show_default=True,
              help="Shifted-style pool images; also writes shifted-train/-val of --num-train/--num-val.")
@click.option("--image-size", default=_synth_defaults().image_size, type=P.ints(8, 4096), show_default=True, help="Image side in pixels.")
@click.option("--num-classes", default=_synth_defaults().num_classes, type=P.ints(2, 8), show_default=True, help="Shape classes (2 to 8).")
@click.option("--decoys", default=_synth_defaults().decoys, type=P.ints(0, 64), show_default=True,
              help="At most this many flat shapes of other classes per image.")
@click.option("--blobs", default=_synth_defaults().blobs, type=P.ints(0, 64), show_default=True, help="At most this many soft blobs.")
@click.option("--scale", default=_synth_defaults().scale, type=(P.floats(0, 0.5, True, True), P.floats(0, 0.5, True, True)), show_default=True,
              help="Target radius range, fraction of the image side.")
@click.option("--texture/--no-texture", default=_synth_defaults().texture, show_default=True,
              help="Stripe texture inside the target.")
@click.option("--noise", default=_synth_defaults().noise, type=P.floats(0, 255), show_default=True, help="Background pixel noise (std).")
@click.option("--shard-size", default=256, type=P.SHARD_SIZE, show_default=True, help="Samples per tar shard.")
@click.option("--seed", default=0, type=P.SEED, show_default=True, help="Every image is a function of (seed, split, index, knobs).")
def synth(out_dir, num_train, num_val, num_pool, num_shifted, image_size, num_classes, decoys, blobs, scale,
          texture, noise, shard_size, seed):
    """Write the embedded synthetic data set: the class is the shape of the one outlined, striped
    object among decoy shapes and blobs. Splits train/val, optional unlabelled pool and shifted style."""
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    try:
        config = SynthConfig(image_size, num_classes, decoys, blobs, tuple(scale), texture, noise)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    info = synth_dataset(out_dir, num_train, num_val, shard_size, seed, config, num_pool, num_shifted)
    click.echo(f"wrote to {out_dir} ({', '.join(info['classes'])}):")
    for split in ("train", "val", "pool", "shifted-pool", "shifted-train", "shifted-val"):
        if info.get(split):
            click.echo(f"  {split:<14} {info['num_' + split]:>7}  '{info[split]}'")


@data.command()
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--shard-size", default=1000, type=P.SHARD_SIZE, show_default=True,
              help="Samples per tar shard.")
@click.option("--prefix", default="shard", show_default=True,
              help="Shard file name prefix (e.g. train, val: splits share OUT_DIR/classes.json).")
@click.option("--seed", default=0, type=P.SEED, show_default=True,
              help="Seed of the shuffle across shards (recorded in OUT_DIR/PREFIX-pack.json).")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True,
              help="Shuffle samples across shards; --no-shuffle keeps class-then-file order (shards then "
                   "hold few classes each, which a streaming trainer's shuffle buffer cannot undo).")
def pack(src_dir, out_dir, shard_size, prefix, seed, shuffle):
    """Pack an ImageFolder (SRC_DIR/<class name>/<image file>) into shards. Labels are indices in
    OUT_DIR/classes.json: written from the sorted class names by the first split packed there, and
    used as is by every later split (a class it lacks is refused, nothing written)."""
    from pathlib import Path

    from attncache.pipeline.data.shards import brace_pattern, pack_image_folder

    existed = (Path(out_dir) / "classes.json").exists()
    shards, ignored = pack_image_folder(src_dir, out_dir, shard_size, prefix, seed, shuffle)
    how = "labels from the existing" if existed else "classes written to"
    click.echo(f"wrote {len(shards)} shards to {out_dir} ({how} {out_dir}/classes.json)")
    click.echo(f"  --data '{brace_pattern(shards)}'")
    click.echo(f"  {'shuffled across shards with --seed ' + str(seed) if shuffle else 'in class order (--no-shuffle)'}"
               f"; manifest {out_dir}/{prefix}-pack.json")
    if ignored:
        click.echo(f"not packed ({len(ignored)} files that are not images):")
        for path in ignored[:20]:
            click.echo(f"  {path}")
        if len(ignored) > 20:
            click.echo(f"  and {len(ignored) - 20} more (every one is listed in {out_dir}/{prefix}-pack.json)")
