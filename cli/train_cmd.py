"""`train` and `evaluate`: students from the cache (or an online teacher). Thin: parse, build config, call."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from attncache.cli import defaults
from attncache.cli import params as P
from attncache.cli.cache_cmd import max_sample_bytes_option
from attncache.cli.outdir import writing_to
from attncache.cli.timm_options import resolve as resolve_timm
from attncache.cli.timm_options import teacher_checkpoint_options, train_timm_options
from attncache.cli.train_config import config_option
from attncache.pipeline._util import atomic
from attncache.pipeline._util.runtime import default_threads

_T = defaults.Train()
_O = defaults.Optim()


def _teacher(teacher, model_args, checkpoint, random_init, teacher_seed, device):
    """The online teacher's TeacherConfig, or None (with a cache)."""
    if teacher is None:
        return None
    from attncache.pipeline.teacher.model import TeacherConfig, parse_model_args

    return TeacherConfig(teacher, parse_model_args(model_args), checkpoint, random_init, teacher_seed, device)


# timm keywords the trainer sets from its own options: a --student-arg with one of them would collide
_OWN_STUDENT_ARGS = {"num_classes": "--num-classes", "drop_path_rate": "--drop-path", "pretrained": "--mode finetune"}


def _student_args(pairs) -> tuple:
    from attncache.pipeline.teacher.model import parse_model_args

    args = parse_model_args(pairs)
    for key, value in args:
        if key in _OWN_STUDENT_ARGS:
            raise click.BadParameter(f"{key}={value} is set by the trainer: use {_OWN_STUDENT_ARGS[key]} instead",
                                     param_hint="'--student-arg'")
    return args


def _recipe_with_mix(recipe: str, mixup: float, cutmix: float) -> str:
    if mixup <= 0 and cutmix <= 0:
        return recipe
    from attncache.pipeline.augment.recipe import PRESETS

    return PRESETS.get(recipe, recipe) + f"|mix(mixup_alpha={mixup},cutmix_alpha={cutmix})"


@click.command()
@config_option
@click.option("--data", multiple=True, required=True, help=f"Training shards (webdataset tars): {P.DATA_FORMS}.")
@click.option("--cache", default=None, type=click.Path(), help="Store written by `precompute` for these shards.")
@click.option("--teacher", default=None, help="Online teacher (timm name or teacher dir) instead of a cache; "
                                                "also the weights of --mode finetune.")
@click.option("--model-arg", "model_args", multiple=True, metavar="K=V", help="timm argument of the teacher.")
@teacher_checkpoint_options("Teacher weights file (.safetensors, or .pth with weights_only=True).")
@click.option("--random-init", is_flag=True, help="Seeded random teacher (tests).")
@click.option("--teacher-seed", default=0, type=P.SEED, help="Seed of --random-init teacher weights.")
@click.option("--mode", type=click.Choice(list(defaults.TRAIN_MODES)), default="distill",
              help="How the teacher's attention is transferred (scratch/finetune are the baselines).")
@click.option("--student", "--model", "student", required=True, help="timm model name of the student.")
@click.option("--student-arg", "--model-kwargs", "student_args", multiple=True, metavar="K=V",
              help="timm argument of the student (--model-kwargs: one K=V each).")
@click.option("--num-classes", type=P.CLASSES, default=None, help="Classes [default: classes.json beside the shards].")
@click.option("--out", "--output", "out", default=None, type=click.Path(file_okay=False),
              help="Run directory (resumed if present) [required unless --resume names it].")
@click.option("--views", type=P.VIEWS, default=None, help="Use only the cache's first N views [default: all].")
@click.option("--max-steps", type=P.STEPS, default=None, help="Optimiser steps (or give --epochs).")
@click.option("--epochs", type=P.EPOCHS, default=None, help="Epochs; epoch e reads cached view e mod V.")
@click.option("--batch-size", "-b", default=_T.batch_size, type=P.BATCH, help="Samples per step per rank.")
@click.option("--layers", default=None, callback=P.layers_callback, help="Student layers to transfer (slice or list) [default: all but last 3].")
@click.option("--heads", default=None, callback=P.heads_callback, help="Distill modes: comma list of heads to transfer [default: all]; "
                                         "the other heads of those layers learn freely.")
@click.option("--distill-weight", default=_T.distill_weight, type=P.WEIGHT, help="Weight of the transfer loss (distill modes).")
@click.option("--lr", default=_O.lr, type=P.RATE, help="Peak learning rate (timm --lr).")
@click.option("--opt-betas", "betas", default=_O.betas, type=click.Tuple([P.floats(0, 1, high_open=True)] * 2),
              metavar="BETA1 BETA2", help="AdamW's betas (timm --opt-betas; the paper's distill recipe: 0.9 0.95).")
@click.option("--min-lr", default=_O.min_lr, type=P.floats(0, 10), help="Final learning rate of the cosine schedule.")
@click.option("--weight-decay", default=_O.weight_decay, type=P.floats(0, 100), help="AdamW weight decay.")
@click.option("--warmup-epochs", default=_O.warmup_epochs, type=P.floats(0, 10**6), help="Linear warmup, in epochs.")
@click.option("--layer-decay", type=P.floats(0, 1, low_open=True), default=None, help="Layer-wise lr decay (e.g. 0.75) [default: off].")
@click.option("--drop-path", default=0.0, type=P.FRACTION, help="Stochastic depth of the student (the teacher never drops).")
@click.option("--smoothing", default=_T.smoothing, type=P.FRACTION, help="Label smoothing.")
@click.option("--mixup", default=0.0, type=P.floats(0, 100), help="Mixup alpha; without a cache only (a cache fixes its mix at precompute: "
                                          "use --recipe train_mix there).")
@click.option("--cutmix", default=0.0, type=P.floats(0, 100), help="CutMix alpha; without a cache only.")
@click.option("--clip-grad", type=P.floats(0, 1e6, low_open=True), default=None, help="Clip the gradient norm [default: off].")
@click.option("--model-ema-decay", type=P.floats(0, 1, low_open=True, high_open=True), default=None, help="Keep an EMA of the weights [default: off].")
@click.option("--recipe", default=_T.recipe, callback=P.recipe_callback, help="Augmentation recipe without a cache (a cache carries its own).")
@click.option("--eval-cache", default=None, type=click.Path(), help="Eval store (precompute --recipe eval).")
@click.option("--eval-data", multiple=True, help="Eval shards (with the eval recipe, or matching --eval-cache), in the forms of --data.")
@click.option("--seed", default=_T.seed, type=P.SEED, help="Seed of the student init, unit order, shuffle and drop path.")
@click.option("--workers", "-j", default=_T.workers, type=P.LOADER_WORKERS,
              help="Loader processes per rank (0: decode in the training process). They change speed and memory "
                   "(about 2 units decoded ahead per worker), never the batches: the same seed trains on the same "
                   "batches, to the same weights, with any worker count.")
@click.option("--shuffle-buffer", default=_T.shuffle_buffer, type=P.ints(0, 10**8),
              help="Samples a shuffle window holds at least (more units join it until it does); 0 or 1: no "
                   "shuffling, units in the epoch's order, samples in tar order.")
@click.option("--interleave", default=_T.interleave, type=P.ints(1, 10**6),
              help="Units (shards) mixed in each shuffle window: every batch draws from this many shards however "
                   "they were sorted (class-ordered shards too). Memory: one window of decoded units per rank.")
@click.option("--amp", type=P.AmpChoice(), default="auto", is_flag=False, flag_value="bf16",
              help="bf16 autocast: auto = on CUDA devices that support it; a bare --amp (timm's flag) is bf16.")
@click.option("--device", default="cpu", help="Training device: cpu, cuda, cuda:1 ...")
@click.option("--threads", default=default_threads(), type=P.THREADS, help="Torch intra-op threads (fixes numerics).")
@click.option("--checkpoint-every", default=_T.checkpoint_every, type=P.STEPS, help="Steps between resumable checkpoints.")
@click.option("--log-every", default=_T.log_every, type=P.STEPS, help="Steps between metrics lines.")
@click.option("--eval-every", type=P.ints(1, 10**6), default=None,
              help="Epochs between val top-1 evaluations on --eval-data/--eval-cache, written to metrics.jsonl "
                   "and shown on the progress bar [default: only at the end].")
@click.option("--json", "as_json", is_flag=True, help="Print the final result as one JSON object.")
@max_sample_bytes_option(_T.max_sample_bytes)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--check-data", type=click.Choice(["size", "full"]), default="size",
              help="How --data is checked against what the cache's teacher saw: size (one stat per shard, always) "
                   "or full (also every shard's sha256 against the one its units recorded; reads all the data).")
@train_timm_options
def train(data, cache, teacher, model_args, checkpoint, random_init, teacher_seed, mode, student, student_args,
          num_classes, out, views, max_steps, epochs, batch_size, layers, heads, distill_weight, lr, betas, min_lr, weight_decay,
          warmup_epochs, layer_decay, drop_path, smoothing, mixup, cutmix, clip_grad, model_ema_decay, recipe,
          eval_cache, eval_data, seed, workers, shuffle_buffer, interleave, amp, device, threads, checkpoint_every,
          log_every, eval_every, as_json, max_sample_bytes, quiet, check_data, **timm):
    """Train a student ViT with attention transfer from a cache (or an online teacher).

    Re-running the same command in the same --out resumes from its last checkpoint (timm's --resume
    CHECKPOINT says the same). timm's spellings are accepted beside ours (README: "From timm"). Under
    `torchrun --nproc_per_node N` the units are split across ranks; rank 0 writes and evaluates.
    """
    from attncache.pipeline.train.loop import TrainConfig
    from attncache.pipeline.train.loop import train as run_train
    from attncache.pipeline.train.optim import OptimConfig
    from attncache.pipeline.train.session import TransferSpec, infer_num_classes
    from attncache.pipeline.train.student import StudentConfig

    if (max_steps is None) == (epochs is None):
        raise click.UsageError("give exactly one of --max-steps or --epochs")
    if cache and (mixup > 0 or cutmix > 0):
        raise click.UsageError("--mixup/--cutmix: the cache fixes its mixing at precompute time "
                               "(precompute --recipe train_mix); they apply only without --cache")
    if eval_every and not (eval_cache or eval_data):
        raise click.UsageError("--eval-every evaluates on a val split: give --eval-data (or --eval-cache)")
    timm_set = resolve_timm(timm, out=out, recipe=recipe, amp=amp, cache=cache)
    out, amp = timm_set.out, timm_set.amp
    if cache and recipe != _T.recipe:
        raise click.UsageError("--recipe: the cache carries the recipe the teacher saw; it applies only without --cache")
    if cache and check_data == "full":  # before any work; the size check runs in every run
        from attncache.pipeline.data.binding import check_store_data
        from attncache.pipeline.store.cache import CacheStore

        check_store_data(CacheStore.open(cache), tuple(data), full=True)
    student_kwargs = _student_args(student_args)
    classes = num_classes or infer_num_classes(tuple(data), cache)
    teacher_cfg = _teacher(teacher, model_args, checkpoint, random_init, teacher_seed, device)
    spec = TransferSpec(StudentConfig(student, student_kwargs, classes, drop_path, seed, timm_set.initial_checkpoint), mode,
                        layers, cache, teacher_cfg, heads)
    optim = OptimConfig(lr=lr, betas=tuple(betas), min_lr=min_lr, weight_decay=weight_decay, layer_decay=layer_decay,
                        warmup_epochs=warmup_epochs, clip_grad=clip_grad, model_ema_decay=model_ema_decay,
                        warmup_lr=timm_set.warmup_lr)
    config = TrainConfig(data=tuple(data), out=out, spec=spec, distill_weight=distill_weight, max_steps=max_steps,
                         epochs=epochs, views=views, batch_size=batch_size, seed=seed, workers=workers,
                         shuffle_buffer=shuffle_buffer, interleave=interleave, smoothing=smoothing,
                         recipe=_recipe_with_mix(timm_set.recipe, mixup, cutmix), eval_cache=eval_cache,
                         eval_data=tuple(eval_data), amp=amp, device=device, threads=threads,
                         checkpoint_every=checkpoint_every, log_every=log_every, eval_every=eval_every, progress=not quiet,
                         optim=optim, max_sample_bytes=max_sample_bytes)
    with writing_to(out):
        result = run_train(config)
    if not result.main:
        return  # under torchrun rank 0 alone reports
    summary = {"steps": result.steps, "samples": result.samples, "seconds": round(result.seconds, 2),
               "out": result.out, "eval": result.final, "skipped": len(result.skipped)}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"trained {result.steps} steps ({result.samples} samples) in {result.seconds:.1f} s -> {out}")
        _echo_skipped(result.skipped, f"{out}/metrics.jsonl")
        if result.final:
            click.echo(f"eval: top1 {result.final['top1']:.2f}  top5 {result.final['top5']:.2f}  "
                       f"({result.final['samples']} samples)")


def _echo_skipped(records: list[dict], where: str, total: int | None = None) -> None:
    """Bad samples recorded and skipped: the count, the first few with key and reason."""
    total = len(records) if total is None else total
    if total:
        click.echo(f"  skipped {total} bad samples (listed with reasons in {where}):")
        for r in records[:5]:
            click.echo(f"    {r['shard']}: {r['key']!r}: {r['reason']}")


@click.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--data", multiple=True, help=f"Eval shards [default: the --cache store's shards]: {P.DATA_FORMS}.")
@click.option("--cache", default=None, type=click.Path(), help="Eval store (needed by copy modes; its recipe is used).")
@click.option("--batch-size", default=128, type=P.BATCH, help="Samples per batch.")
@click.option("--workers", default=2, type=P.LOADER_WORKERS, help="Loader processes.")
@click.option("--device", default="cpu", help="Device.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="JSON file to write [default: eval.json in the run directory].")
@click.option("--ensemble", "others", multiple=True, type=click.Path(exists=True),
              help="Other run(s) to average class probabilities with (e.g. distill + finetune); prints the "
                   "ensemble's top-1 and each member's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (top1, top5, loss, confusion).")
def evaluate(run, data, cache, batch_size, workers, device, out_file, others, as_json):
    """Top-1/top-5 of a trained student (run directory, or its model.safetensors) on an eval split."""
    from attncache.pipeline.train.session import evaluate_run

    if not data and not cache:
        raise click.UsageError("give --data (eval shards) and/or --cache (an eval store)")
    if others:
        from attncache.pipeline.train.ensemble import ensemble_top1

        runs = [run, *others]
        report = ensemble_top1(runs, tuple(data), [cache] * len(runs), batch_size, workers, device)
        if out_file:
            atomic.write_json(Path(out_file), report)
        if as_json:
            click.echo(json.dumps(report))
        else:
            click.echo(f"ensemble top1 {report['top1']:.2f} ({report['samples']} samples); members: "
                       + ", ".join(f"{r} {a:.2f}" for r, a in zip(runs, report["top1_each"])))
        return
    report = evaluate_run(run, tuple(data), cache, batch_size, workers, device)
    target = Path(out_file) if out_file else Path(report["run_dir"]) / "eval.json"
    atomic.write_json(target, report)  # a kill mid-write leaves the old eval.json, never half a file
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"top1 {report['top1']:.2f}  top5 {report['top5']:.2f}  loss {report['loss']:.4f}  "
               f"({report['samples']} samples) -> {target}")
    _echo_skipped(report["skipped_samples"], str(target), report["skipped"])
    for pair in report["most_confused"]:
        click.echo(f"  class {pair['true']} taken for {pair['predicted']}: {pair['count']}")
    sys.stdout.flush()
