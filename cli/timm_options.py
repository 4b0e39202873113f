"""timm train.py's spellings on `attncache train`, each mapped onto the setting we already have
(issue 16 item 1), and the teacher's weights renamed `--teacher-checkpoint` (timm's `--checkpoint`
habits mean the model's own weights).

Why a module of its own: the aliases are many and each needs a rule (what it maps onto, when it
must be refused), and train_cmd.py stays a thin list of our options. Nothing here imports torch, so
`--help` stays fast; `resolve` runs when the command does.
"""
from __future__ import annotations

from dataclasses import dataclass

import click

from attncache.cli import params as P

OPTIMIZERS = ("adamw",)  # timm create_optimizer_v2 names the trainer runs (its checkpoints and recipes assume AdamW)
SCHEDULES = ("cosine",)  # timm --sched names our warmup + cosine schedule is
AUGMENT = ("aa", "reprob", "hflip", "scale", "color_jitter")


def _one_of(names: tuple[str, ...], why: str):
    def callback(ctx, param, value):
        if value is None or value.lower() in names:
            return None if value is None else value.lower()
        raise click.BadParameter(f"{value!r} is not supported ({why}); supported: {', '.join(names)}", ctx, param)
    return callback


def train_timm_options(f):
    """timm's options that have no spelling of ours (the aliases of ours are on the options themselves)."""
    options = [
        click.option("--resume", default=None, type=click.Path(), metavar="PATH",
                     help="timm --resume: continue the run whose checkpoint PATH is (checkpoint-*.safetensors, its "
                          "state.json or the run directory) with its weights, EMA, optimiser and loader position; "
                          "the same as re-running its command with --out RUN_DIR (--out may then be left out)."),
        click.option("--initial-checkpoint", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                     help="timm --initial-checkpoint: student weights to start from (.safetensors, or .pth loaded "
                          "with weights_only=True); every key and shape must fit the student."),
        click.option("--opt", default=None, callback=_one_of(OPTIMIZERS, "the trainer runs timm's AdamW"),
                     help=f"timm --opt: the optimiser; only {', '.join(OPTIMIZERS)} (the one the trainer runs)."),
        click.option("--sched", default=None, callback=_one_of(SCHEDULES, "the schedule is linear warmup then "
                                                                          "cosine, per step"),
                     help=f"timm --sched: only {', '.join(SCHEDULES)} (linear warmup, then cosine to --min-lr)."),
        click.option("--warmup-lr", default=None, type=P.floats(0, 10), metavar="LR",
                     help="timm --warmup-lr: the warmup starts from this lr [default: 0, the paper's warmup]."),
        click.option("--aa", default=None, metavar="rand-m9-mstd0.5-inc1",
                     help="timm --aa, without a cache: RandAugment string onto the recipe's randaug op (timm's "
                          "defaults for sections not given: m10 n2 mstd0 p0.5 inc0); none removes it."),
        click.option("--reprob", default=None, type=P.FRACTION,
                     help="timm --reprob, without a cache: random erasing probability (erase(p=...); 0 removes it)."),
        click.option("--hflip", default=None, type=P.floats(0, 1),
                     help="timm --hflip, without a cache: horizontal flip probability (flip(p=...); 0 removes it)."),
        click.option("--scale", default=None, type=click.Tuple([P.floats(0, 1, low_open=True)] * 2),
                     metavar="LO HI", help="timm --scale, without a cache: the rrc op's area scale range."),
        click.option("--color-jitter", default=None, type=P.floats(0, 10), metavar="X",
                     help="timm --color-jitter, without a cache: jitter(brightness=X,contrast=X,saturation=X) "
                          "(0 removes it; timm drops jitter under --aa, here both apply)."),
        click.option("--amp-dtype", default=None, type=click.Choice(["bfloat16", "float16"]),
                     help="timm --amp-dtype: bfloat16 is --amp bf16; float16 is refused (it needs a loss scaler "
                          "the trainer does not have)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _deprecated_checkpoint(ctx, param, value):
    if value is None:
        return
    click.echo("attncache: note: --checkpoint (the teacher's weights) is deprecated: use --teacher-checkpoint "
               "(timm's --resume/--initial-checkpoint name the student's own)", err=True)
    chosen = ctx.params.get("checkpoint")
    if chosen is not None and chosen != value:
        raise click.UsageError(f"--teacher-checkpoint {chosen} and --checkpoint {value} name two teacher weights: "
                               "give --teacher-checkpoint only")
    ctx.meta["attncache.deprecated_checkpoint"] = value


def _teacher_checkpoint(ctx, param, value):
    old = ctx.meta.get("attncache.deprecated_checkpoint")
    if value is not None and old is not None and old != value:
        raise click.UsageError(f"--teacher-checkpoint {value} and --checkpoint {old} name two teacher weights: "
                               "give --teacher-checkpoint only")
    return value if value is not None else old


def teacher_checkpoint_options(help_text: str):
    """`--teacher-checkpoint FILE` (the value reaches the command as `checkpoint`) and its old spelling
    `--checkpoint`, still working, with a one-line note on stderr. The old one is declared first, so
    a config file's `checkpoint:` key is read before the new option takes it over."""
    new = click.option("--teacher-checkpoint", "checkpoint", default=None, type=click.Path(dir_okay=False),
                       callback=_teacher_checkpoint, metavar="FILE", help=help_text)
    old = click.option("--checkpoint", "deprecated_checkpoint", default=None, type=click.Path(dir_okay=False),
                       expose_value=False, callback=_deprecated_checkpoint, metavar="FILE",
                       help="Deprecated spelling of --teacher-checkpoint.")
    return lambda f: old(new(f))


@dataclass(frozen=True)
class Mapped:
    """What the timm options change of ours."""

    out: str
    recipe: str
    amp: str
    warmup_lr: float
    initial_checkpoint: str | None


def resolve(timm: dict, *, out: str | None, recipe: str, amp: str, cache: str | None) -> Mapped:
    """Map the timm options onto ours, or refuse in one line (click's UsageError)."""
    from attncache.pipeline._util.spec_error import SpecError
    from attncache.pipeline.augment.timm_args import TimmAugment, apply_timm_augment

    aug = TimmAugment(**{k: timm[k] for k in AUGMENT})
    if cache and aug.given():
        raise click.UsageError(f"{'/'.join(aug.given())}: the cache fixes the augmentation at precompute "
                               "(precompute --recipe ...); they apply only without --cache")
    try:
        recipe = apply_timm_augment(recipe, aug)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from None
    return Mapped(_out(timm["resume"], out), recipe, _amp(amp, timm["amp_dtype"]), timm["warmup_lr"] or 0.0,
                  timm["initial_checkpoint"])


def _amp(amp: str, dtype: str | None) -> str:
    if dtype == "float16":
        raise click.UsageError("--amp-dtype float16: float16 autocast needs a loss scaler (GradScaler) whose state a "
                               "resumed run would have to restore, and the trainer has none; use --amp-dtype bfloat16")
    if dtype == "bfloat16" and amp == "none":
        raise click.UsageError("--amp none and --amp-dtype bfloat16 contradict each other: give one")
    return "bf16" if dtype == "bfloat16" else amp


def _out(resume: str | None, out: str | None) -> str:
    if resume is None:
        if out is None:
            raise click.UsageError("give --out RUN_DIR (or --resume a run's checkpoint)")
        return out
    from pathlib import Path

    from attncache.pipeline.train.checkpoint import resume_dir

    run = resume_dir(resume)
    if out is not None and Path(out).resolve() != run.resolve():
        raise click.UsageError(f"--resume {resume} is a checkpoint of the run in {run}, but --out is {out}: a run "
                               f"resumes in its own directory; leave --out out or give --out {run}")
    return out if out is not None else str(run)
