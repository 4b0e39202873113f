"""`attncache bench`: the fidelity-bytes frontier (pipeline.tools.fidelity) and the scripts of benchmarks/."""
from __future__ import annotations

import importlib
import json

import click

from attncache.cli import defaults
from attncache.cli import params as P
from attncache.cli.cache_cmd import make_teacher_config, teacher_options

_DEFAULTS = defaults.Fidelity()


@click.group()
def bench() -> None:
    """Benchmarks measured on this machine (more in benchmarks/ and BENCHMARKS.md)."""


@bench.command()
@click.argument("store_or_teacher")
@click.option("--teacher", default=None,
              help="STORE mode: a teacher name or directory to load weights from [default: the store's teacher].")
@teacher_options
@click.option("--data", "data", multiple=True,
              help=f"Teacher mode, shards (webdataset tars): {P.DATA_FORMS}. "
                   "STORE mode reads the store's own shards.")
@click.option("--samples", default=_DEFAULTS.samples, type=P.ints(1, 10**7), help="Samples to capture Q/K for (the first K in shard order).")
@click.option("--recipe", default=None, callback=P.recipe_callback,
              help="Teacher mode: augmentation recipe [default: eval]. STORE mode replays the store's.")
@click.option("--layers", default=None, callback=P.layers_callback, help="Teacher mode: layers, slice or list [default: all]. STORE mode: the store's.")
@click.option("--heads", default=None, callback=P.heads_callback, help="Teacher mode: comma list of heads [default: all]. STORE mode: the store's.")
@click.option("--view", default=0, type=P.VIEW_INDEX, help="STORE mode: which view's cached samples to read.")
@click.option("--encodings", "encodings", multiple=True, metavar="SPEC", callback=P.encoding_callback,
              help="Encodings to compare, repeatable or space-separated [default: teacher mode "
                   f"{' '.join(defaults.FIDELITY_GRID)} (ranks above the head dim skipped); STORE mode the store's encoding "
                   "and exact:fp16].")
@click.option("--compression", default=None, callback=P.compression_callback,
              help="zstd[:LEVEL][:shuffle|bitshuffle[:block=SIZE]] or none for stored bytes [default: precompute's, "
                   f"{defaults.COMPRESSION_HELP}; STORE mode: the store's].")
@click.option("--batch-size", default=_DEFAULTS.batch_size, type=P.BATCH, help="Samples per encode / decode call (and teacher batch).")
@click.option("--threads", default=_DEFAULTS.threads, type=P.THREADS, help="Torch intra-op threads.")
@click.option("--device", default="cpu", help="Device of the teacher, encoding and decoding: cpu, cuda, ...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout instead of the tables.")
@click.option("--out-png", type=click.Path(dir_okay=False), default=None,
              help="Also draw KL against bytes (and KL per layer) to this PNG.")
def fidelity(store_or_teacher, teacher, model_args, checkpoint, random_init, seed, data, samples, recipe, layers,
             heads, view, encodings, compression, batch_size, threads, device, as_json, out_png):
    """Mean KL per layer and overall against bytes per sample, encode and decode MB/s, for a grid of encodings.

    STORE_OR_TEACHER is a store (its cached factors are scored against the teacher re-run on the
    same replayed pixels) or a teacher: a timm name or directory, with --teacher-checkpoint, --random-init
    and --model-arg as for precompute, and --data. Random-weight teachers are flagged: their flat
    attention makes every encoding look better than it is.
    """
    from attncache.pipeline.tools.fidelity import (FidelityConfig, format_table, is_store, plot_frontier, run_fidelity,
                                                   run_store_fidelity)

    specs = tuple(s for text in encodings for s in text.split())
    try:
        if is_store(store_or_teacher):
            given = {"--data": data, "--recipe": recipe, "--layers": layers, "--heads": heads}
            wrong = [name for name, value in given.items() if value]
            if wrong:
                raise click.UsageError(f"{', '.join(wrong)}: STORE mode uses the store's own shards, recipe, "
                                       "layers and heads")
            cfg = make_teacher_config(teacher or "", model_args, checkpoint, random_init, seed, device)
            report = run_store_fidelity(store_or_teacher, cfg, samples, view, specs, compression, batch_size, threads)
        else:
            if not data:
                raise click.UsageError("teacher mode needs --data GLOB (or give a store)")
            if teacher:
                raise click.UsageError("--teacher is for STORE mode; the teacher is the argument here")
            config = FidelityConfig(
                teacher=make_teacher_config(store_or_teacher, model_args, checkpoint, random_init, seed, device),
                data=tuple(data), samples=samples, recipe=recipe or "eval", seed=seed, layers=layers or ":",
                heads=heads, encodings=specs, compression=compression, batch_size=batch_size,
                threads=threads)
            report = run_fidelity(config)
    except ValueError as exc:  # bad spec, rank above head dim, wrong weights, no samples
        raise click.UsageError(str(exc)) from exc
    if out_png:
        report["png"] = plot_frontier(report, out_png)
    click.echo(json.dumps(report) if as_json else format_table(report))
    for warning in report["warnings"]:
        click.echo(f"WARNING: {warning}", err=True)


def _script_command(name: str, module: str, summary: str) -> click.Command:
    """A benchmark script of benchmarks/ as `attncache bench NAME`: its own options (see
    `attncache bench NAME --help`) pass through unchanged, so the script and the command agree."""

    @click.command(name=name, help=summary + " Options: `attncache bench " + name + " --help`.",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                     "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        importlib.import_module(module).main(list(args))

    return command


for _name, _module, _summary in (
        ("precompute", "attncache.benchmarks.precompute", "Precompute images/s against the bare teacher, and bytes per encoding."),
        ("precompute-profile", "attncache.benchmarks.precompute_profile", "Where precompute time goes, per stage."),
        ("compression", "attncache.benchmarks.compression", "Bytes saved against CPU seconds spent, per compressor and encoding."),
        ("train", "attncache.benchmarks.train", "Student steps/s: scratch, distill from the cache, distill online."),
        ("students", "attncache.benchmarks.students", "Student accuracy: scratch against distilled (and copy) students per encoding, seeds."),
        ("students-plot", "attncache.benchmarks.students_plot", "Student top-1 against cache bytes, from a `bench students` directory."),
        ("loader", "attncache.benchmarks.loader", "Images/s one loader worker delivers (decode, replay, factor reads), 32 and 224 px."),
        ("compare-embedded", "attncache.benchmarks.compare_embedded", "The README's compare figure from real runs on the embedded data.")):
    bench.add_command(_script_command(_name, _module, _summary))
