"""`precompute`, `verify`, `inspect`, `show`: build a cache and look at it. Thin: parse, call pipeline."""
from __future__ import annotations

import json
import sys

import click

from attncache.cli import defaults
from attncache.cli import params as P
from attncache.cli.outdir import writing_to
from attncache.cli.timm_options import teacher_checkpoint_options

_DEFAULTS = defaults.Precompute()


def teacher_options(f):
    """The options that name a teacher, shared by every command that loads one."""
    f = click.option("--seed", default=0, type=P.SEED, help="Seed of augmentation draws (and of --random-init weights).")(f)
    f = click.option("--random-init", is_flag=True, help="Initialise the teacher from --seed (tests and demos).")(f)
    f = teacher_checkpoint_options("The teacher's local weights: .safetensors, or .pth/.pt loaded with "
                                   "weights_only=True (--checkpoint: the old spelling, still read).")(f)
    f = click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
                     help="timm keyword argument for the teacher, e.g. img_size=32 (repeatable).")(f)
    return f


def max_sample_bytes_option(default: int):
    """--max-sample-bytes, shared by precompute and train: range-checked by click before any work."""
    return click.option("--max-sample-bytes", type=click.IntRange(*defaults.MAX_SAMPLE_BYTES_RANGE), default=default,
                        show_default=True,
                        help="A sample whose tar members add up to more bytes is recorded and skipped without "
                             "being read into memory.")


def make_teacher_config(teacher: str, model_args, checkpoint, random_init, seed, device="cpu"):
    """The TeacherConfig of the shared teacher options (imports the teacher room: call it when a command runs)."""
    from attncache.pipeline.teacher.model import TeacherConfig, parse_model_args

    return TeacherConfig(teacher, parse_model_args(model_args), checkpoint, random_init, seed, device)


@click.command(epilog=defaults.recipe_grammar())
@click.option("--data", "data", multiple=True, required=True,
              help=f"Shards to precompute (webdataset tars): {P.DATA_FORMS}.")
@click.option("--teacher", required=True, help="timm model name, or a directory written by `teacher pretrain`.")
@teacher_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store path (created, or resumed if it is this job's).")
@click.option("--views", default=_DEFAULTS.views, type=P.VIEWS, help="Augmentation views per sample (epoch e uses view e mod V).")
@click.option("--recipe", default=_DEFAULTS.recipe, callback=P.recipe_callback, help="'train', 'eval', or an op spec like 'rrc|flip|normalize'.")
@click.option("--layers", default=_DEFAULTS.layers, callback=P.layers_callback, help="Layers to cache, Python slice syntax ('0:-3') or list [default: 0:-3, all but the last 3: the layers a default `train` student transfers, and the teacher's forward stops after them; every layer for teachers of 3 or fewer; ':' caches every layer].")
@click.option("--heads", default=None, callback=P.heads_callback, help="Comma list of heads to cache (default: all).")
@click.option("--encoding", default=_DEFAULTS.encoding, callback=P.encoding_callback,
              help="exact[:fp16|fp32|bf16|int8|int4|fp8] or lowrank:r=RANKS[:fp16|fp32|bf16|int8|int4|fp8] "
                   "(RANKS: R, or one per cached layer); `bench fidelity` compares them.")
@click.option("--compression", default=_DEFAULTS.compression, callback=P.compression_callback,
              help=f"zstd[:LEVEL][:shuffle|bitshuffle[:block=SIZE]] or none [default: {defaults.COMPRESSION_HELP}] (recorded: "
                   "part of the cache id).")
@click.option("--batch-size", default=_DEFAULTS.batch_size, type=P.BATCH, help="Teacher batch size (recorded: it fixes numerics).")
@click.option("--workers", default=_DEFAULTS.workers, type=P.LOADER_WORKERS, help="Loader processes decoding and augmenting.")
@click.option("--threads", default=_DEFAULTS.threads, type=P.THREADS,
              help="Torch intra-op threads of each teacher, the same in every --ray mode (recorded in the store: "
                   "it fixes the float numerics).")
@click.option("--device", default="cpu", help="Device of the teacher: cpu, cuda, cuda:1 ...")
@click.option("--on-bad-sample", type=click.Choice(list(defaults.ON_BAD_SAMPLE)), default=_DEFAULTS.on_bad_sample,
              help="fail: stop at the first unusable sample; skip: record it with its reason and go on.")
@click.option("--max-skipped", type=P.ints(0, P.BIG), default=None, help="With skip: fail once more samples than this are skipped.")
@click.option("--ray", "ray_address", default="local",
              help="local: start Ray on this machine with its CPUs/GPUs; ADDRESS: join a cluster (auto, "
                   "127.0.0.1:6379, ray://host:10001); none: run in this process with loader workers.")
@click.option("--num-workers", type=P.ints(1, 4096), default=None,
              help="Ray teacher actors (default: one per --cpus-per-worker CPUs, or per GPU).")
@click.option("--cpus-per-worker", type=P.floats(0, 1024, low_open=True), default=None,
              help="CPUs reserved per Ray teacher actor [default: --threads, so actors never oversubscribe].")
@click.option("--gpus-per-worker", default=0.0, type=P.floats(0, 64), help="GPUs per Ray teacher actor (1 for one per GPU).")
@click.option("--max-retries", default=2, type=P.ints(0, 100), help="Ray: re-runs of a unit that raised before it counts as failed.")
@click.option("--lease-timeout", default=_DEFAULTS.lease_timeout, type=P.floats(0, 7 * 86400, low_open=True),
              help="Seconds without a heartbeat after which another job may take over this store's lease "
                   "(one precompute writes a store at a time; a holder dead on this host frees it at once).")
@max_sample_bytes_option(_DEFAULTS.max_sample_bytes)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--repair", is_flag=True,
              help="Re-check every done unit byte by byte against its marker and rewrite the units that fail; "
                   "restore lost or edited root metadata when the units' markers show this job wrote them.")
def precompute(data, teacher, model_args, checkpoint, random_init, seed, out, views, recipe, layers, heads,
               encoding, compression, batch_size, workers, threads, device, on_bad_sample, max_skipped, ray_address,
               num_workers, cpus_per_worker, gpus_per_worker, max_retries, lease_timeout, max_sample_bytes, quiet,
               repair):
    """Run the teacher once over the data and write attention factors to a Zarr store.

    Units (input shard x view) whose marker is valid and whose files have the recorded sizes are
    skipped, so re-running the same command resumes an interrupted job; with --repair every byte
    is checked and damaged units are rewritten.
    """
    from attncache.pipeline.precompute.job import OnBadSample, PrecomputeConfig
    from attncache.pipeline.precompute.local import run_precompute

    config = PrecomputeConfig(
        data=tuple(data), out=out, teacher=make_teacher_config(teacher, model_args, checkpoint, random_init, seed, device),
        views=views, seed=seed, recipe=recipe, layers=layers, heads=heads, encoding=encoding, compression=compression,
        batch_size=batch_size, workers=workers, threads=threads, on_bad_sample=OnBadSample(on_bad_sample),
        max_skipped=max_skipped, progress=not quiet, lease_timeout=lease_timeout, repair=repair,
        max_sample_bytes=max_sample_bytes)
    if gpus_per_worker and device == "cpu":
        raise click.UsageError("--gpus-per-worker reserves GPUs, but the teacher runs on --device cpu: "
                               "pass --device cuda")
    with writing_to(out):
        if ray_address == "none":
            summary = run_precompute(config)
        else:
            from attncache.pipeline.precompute.ray_runner import RayOptions, run_precompute_ray

            summary = run_precompute_ray(config, RayOptions(ray_address, num_workers, cpus_per_worker,
                                                            gpus_per_worker, max_retries))
    for line in summary.lines():
        click.echo(line)


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--recompute", type=P.ints(0, 10**6), default=0, help="Re-run the teacher on K random cached samples.")
@click.option("--teacher", default=None, help="Teacher for --recompute (name or directory).")
@teacher_options
@click.option("--tolerance", default=1e-4, type=P.floats(0, 1e6), help="Allowed KL excess of the cache over a fresh encoding.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def verify(store, recompute, teacher, model_args, checkpoint, random_init, seed, tolerance, as_json):
    """Check a store: schema, every unit's marker, checksums and counts. Exit 1 naming each bad unit."""
    from attncache.pipeline.data.shards import redact
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.tools.recompute import recompute_check
    from attncache.pipeline.store.checks import verify_store

    report = verify_store(store, progress=not as_json)
    result = {"ok": report.ok, "units_ok": report.units_ok, "units_total": report.units_total,
              "problems": report.problems}
    if recompute and report.ok:
        if teacher is None:
            raise click.UsageError("--recompute needs --teacher (and --teacher-checkpoint or --random-init as at precompute)")
        result["recompute"] = recompute_check(
            CacheStore.open(store), make_teacher_config(teacher, model_args, checkpoint, random_init, seed),
            recompute, seed, tolerance)
        result["ok"] = result["ok"] and result["recompute"]["ok"]
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{redact(store)}: {report.units_ok}/{report.units_total} units ok")
        for problem in report.problems:
            click.echo(f"  PROBLEM {problem}")
        if report.problems:
            from attncache.pipeline.store.integrity import REPAIR_ADVICE
            click.echo(f"to repair: {REPAIR_ADVICE} (it re-checks every unit and rewrites the damaged ones)")
        if "recompute" in result:
            r = result["recompute"]
            click.echo(f"recompute: {r['samples']} samples, max KL(teacher || cache) {r['max_kl']:.3g}, "
                       f"fresh encoding {r['max_kl_fresh_encoding']:.3g}, mismatched {len(r['mismatched'])}")
    sys.exit(0 if result["ok"] else 1)


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--keys", "list_keys", is_flag=True, help="List the sample keys `show --key` takes, one per line.")
@click.option("--view", default=0, type=P.VIEW_INDEX, help="With --keys: the augmentation view whose keys to list.")
def inspect(store, as_json, list_keys, view):
    """Print a store's metadata, units done/total, bytes on disk and per sample, ratio to fp32 maps."""
    from attncache.pipeline.store.checks import inspect_store

    if list_keys:
        from attncache.pipeline.store.cache import CacheStore
        from attncache.pipeline.tools.show import cached_keys

        cache = CacheStore.open(store)
        if view >= cache.meta["views"]:
            raise click.BadParameter(f"view {view} is not cached: the store has views 0..{cache.meta['views'] - 1}",
                                     param_hint="'--view'")
        keys = cached_keys(cache, view)
        click.echo(json.dumps(keys) if as_json else "\n".join(keys))
        return
    info = inspect_store(store)
    if as_json:
        click.echo(json.dumps(info))
        return
    from attncache.pipeline.store.layout import compression_spec

    for key in ("path", "teacher", "encoding", "compression", "recipe", "seed", "views", "layers", "heads", "tokens",
                "units_done", "units_total", "samples_written", "samples_skipped", "bytes_on_disk",
                "bytes_per_sample", "raw_fp32_map_bytes_per_sample", "ratio_to_raw_fp32_maps",
                "fidelity_kl_per_layer", "compute"):
        value = compression_spec(info[key]) if key == "compression" else info[key]
        value = f"{value:,.1f}" if isinstance(value, float) else value
        click.echo(f"{key:>32}: {value}")


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--key", required=True, help="Sample key (webdataset __key__; `inspect --keys` lists them).")
@click.option("--view", default=0, type=P.VIEW_INDEX, help="Augmentation view.")
@click.option("--layers", default=None, callback=P.layers_callback, help="Layers to draw (slice or list over teacher layers; default: 4 spread out).")
@click.option("--heads", default=None, callback=P.heads_callback, help="Comma list of heads (default: all cached heads).")
@click.option("--query", type=click.Choice(["cls", "mean"]), default="cls", help="Which query row to draw.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
def show(store, key, view, layers, heads, query, out):
    """Draw the replayed augmented image and its cached attention maps to a PNG.

    Every map shares one colour scale (the colour bar), so a near-uniform teacher looks flat
    beside a peaked one; the title names the teacher with its model arguments.
    """
    import numpy as np

    from attncache.pipeline.tools.show import find_key, render
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.teacher.model import resolve_heads, resolve_layers

    cache = CacheStore.open(store)
    stored = cache.meta["layers"]
    if layers is None:
        chosen = sorted({stored[i] for i in np.linspace(0, len(stored) - 1, min(4, len(stored))).round().astype(int)})
    else:
        chosen = [l for l in resolve_layers(layers, cache.meta["teacher"]["num_layers"])]
        missing = [l for l in chosen if l not in stored]
        if missing:
            raise click.BadParameter(f"layers {missing} are not cached (cached: {stored})", param_hint="'--layers'")
    if view >= cache.meta["views"]:
        raise click.BadParameter(f"view {view} is not cached: the store has views 0..{cache.meta['views'] - 1}",
                                 param_hint="'--view'")
    head_list = None if heads is None else resolve_heads(heads, cache.meta["teacher"]["num_heads"])
    missing = sorted(set(head_list or ()) - set(cache.meta["heads"]))
    if missing:
        raise click.BadParameter(f"heads {missing} are not cached (cached: {cache.meta['heads']})",
                                 param_hint="'--heads'")
    try:
        find_key(cache, key, view)
    except KeyError as exc:  # a key the store does not hold (find_key's only error)
        raise click.BadParameter(f"{exc.args[0]}; `attncache inspect --keys` lists the keys it holds",
                                 param_hint="'--key'") from None
    click.echo(render(cache, key, view, chosen, head_list, query, out))

