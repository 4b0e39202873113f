"""`attncache data synth|pack`: write webdataset shards to precompute from."""
from __future__ import annotations

import click

from pipeline.data import brace_pattern, pack_image_folder


@click.group()
def data():
    """Make webdataset tar shards: the embedded synthetic set, or your own image folder."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--num-train", default=2048, show_default=True, help="Training images.")
@click.option("--num-val", default=512, show_default=True, help="Validation images.")
@click.option("--image-size", default=32, show_default=True, help="Side of the square images in pixels.")
@click.option("--shard-size", default=256, show_default=True, help="Samples per tar shard.")
@click.option("--seed", default=0, show_default=True, help="Every image is a function of (seed, split, index).")
@click.option("--num-classes", default=4, show_default=True, help="Shape classes (2 to 8).")
def synth(out_dir, num_train, num_val, image_size, shard_size, seed, num_classes):
    """Write the embedded synthetic data set (shapes among distractors) as train/val shards."""
    from pipeline.synth import synth_dataset

    info = synth_dataset(out_dir, num_train, num_val, image_size, shard_size, seed, num_classes)
    click.echo(f"wrote {num_train} train and {num_val} val images ({', '.join(info['classes'])}) to {out_dir}")
    click.echo(f"  --data '{info['train']}'")
    if info["val"]:
        click.echo(f"  --data '{info['val']}'   (validation)")


@data.command()
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--shard-size", default=1000, show_default=True, help="Samples per tar shard.")
@click.option("--prefix", default="shard", show_default=True, help="Shard file name prefix.")
def pack(src_dir, out_dir, shard_size, prefix):
    """Pack an ImageFolder (SRC_DIR/<class name>/<image file>) into shards; labels = sorted class index."""
    shards, ignored = pack_image_folder(src_dir, out_dir, shard_size, prefix)
    click.echo(f"wrote {len(shards)} shards to {out_dir} (classes in {out_dir}/classes.json)")
    click.echo(f"  --data '{brace_pattern(shards)}'")
    if ignored:
        click.echo(f"not packed ({len(ignored)} files that are not images):")
        for path in ignored[:20]:
            click.echo(f"  {path}")
