"""`attncache plan`: predicted store size and precompute time. Thin: parse, call pipeline.tools.plan."""
from __future__ import annotations

import json

import click

from attncache.cli import defaults
from attncache.cli import params as P

_DEFAULTS = defaults.Plan()


@click.command()
@click.option("--teacher", required=True,
              help="timm model name, or a teacher directory (only its model and arguments are used: planning "
                   "builds the architecture with random weights, no downloads).")
@click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
              help="timm keyword argument for the teacher, e.g. img_size=32 (repeatable).")
@click.option("--samples", type=P.ints(1, P.BIG), required=True, help="Samples in the data set.")
@click.option("--views", default=_DEFAULTS.views, type=P.VIEWS, help="Augmentation views per sample.")
@click.option("--layers", default=_DEFAULTS.layers, callback=P.layers_callback, help="Layers to cache, Python slice syntax ('0:-3') or list [default: precompute's, 0:-3: all but the last 3, the layers a default `train` student transfers; ':' plans every layer].")
@click.option("--heads", default=None, callback=P.heads_callback, help="Comma list of heads to cache (default: all).")
@click.option("--encoding", default=_DEFAULTS.encoding, callback=P.encoding_callback,
              help="exact[:fp16|fp32|bf16|int8|int4|fp8] or lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8], "
                   "RANKS = R or one per cached layer (R,R,... ; RxK repeats).")
@click.option("--compression", default=_DEFAULTS.compression, callback=P.compression_callback,
              help="zstd[:LEVEL][:shuffle|bitshuffle[:block=SIZE]] or none, used by --compression-factor measured "
                   f"[default: precompute's, {defaults.COMPRESSION_HELP}].")
@click.option("--compression-factor", default=_DEFAULTS.compression_factor, type=P.CompressionFactor(),
              help="Divide factor bytes by this: none (plan the uncompressed size), a number (e.g. from "
                   "`bench fidelity`), or 'measured' (on random inputs and weights: rough).")
@click.option("--recipe", default=_DEFAULTS.recipe, callback=P.recipe_callback, help="Augmentation recipe (sets the aug array's width).")
@click.option("--key-bytes", default=_DEFAULTS.key_bytes, type=P.ints(0, 2**20), help="Typical length of a sample key in bytes.")
@click.option("--mode", type=click.Choice(list(defaults.PLAN_MODES)), default=None,
              help="Transfer mode the store must serve; an encoding that cannot serve it is refused (exit 2).")
@click.option("--images-per-s", type=P.floats(0, 1e9, low_open=True), default=None,
              help="Precompute throughput to plan with [default: measured here on random inputs].")
@click.option("--batch-size", default=_DEFAULTS.batch_size, type=P.BATCH, help="Batch size of the throughput measurement.")
@click.option("--measure-batches", default=_DEFAULTS.measure_batches, type=P.ints(1, 10**4),
              help="Timed batches of the throughput measurement (after one warm-up batch).")
@click.option("--threads", default=_DEFAULTS.threads, type=P.THREADS, help="Torch intra-op threads of the measurement.")
@click.option("--device", default="cpu", help="Device of the throughput measurement: cpu, cuda, ...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def plan(teacher, model_args, samples, views, layers, heads, encoding, compression, compression_factor, recipe,
         key_bytes, mode, images_per_s, batch_size, measure_batches, threads, device, as_json):
    """Predict a store's size (per array and in total) and the precompute time, before running it.

    Refuses an encoding that cannot serve --mode: copy_q, copy_k, distill_q and distill_k need
    Q and K themselves (exact encodings); copy and distill work with every encoding.
    """
    from attncache.pipeline.teacher.model import TeacherConfig, parse_model_args
    from attncache.pipeline.tools.plan import PlanConfig, make_plan, plan_lines

    config = PlanConfig(
        teacher=TeacherConfig(teacher, parse_model_args(model_args), device=device), samples=samples, views=views,
        layers=layers, heads=heads, encoding=encoding, compression=compression, compression_factor=compression_factor,
        recipe=recipe, key_bytes=key_bytes, mode=mode, images_per_s=images_per_s, batch_size=batch_size,
        measure_batches=measure_batches, threads=threads)
    try:
        result = make_plan(config)
    except ValueError as exc:  # PlanError, bad encoding / compression / layers / recipe
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps(result) if as_json else "\n".join(plan_lines(result)))
