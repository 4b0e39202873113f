"""`attncache demo`: the whole job end to end on the embedded data, with a teacher pre-trained here."""
from __future__ import annotations

import click

from attncache.cli import defaults

_D = defaults.Demo()
QUICK = defaults.DemoQuick()


@click.command()
@click.option("--out", default=_D.out, show_default=True, type=click.Path(file_okay=False),
              help="Working directory (recreated).")
@click.option("--quick", is_flag=True, help=f"A smaller run for CI, under a minute: {QUICK.num_train} train images, "
                                            f"{QUICK.teacher_epochs} teacher and {QUICK.student_epochs} student epochs.")
@click.option("--teacher-method", type=click.Choice(["supervised", "mae"]), default=_D.teacher_method,
              show_default=True, help="How the tiny teacher is pre-trained: supervised on the train split, or MAE "
                                      "on the unlabelled pool (the paper's; its attention does not transfer at this "
                                      "scale, see RESULTS.md).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, quick, teacher_method, quiet):
    """Synthetic data -> pre-train a tiny teacher -> precompute its attention (train views and the
    eval split) -> verify -> train a student by attention distillation from the cache and one from
    scratch with the same steps -> evaluate -> table, attention figure, learning curves.

    Defaults: 2048 train / 512 val / 2048 unlabelled images at 32 px, teacher 30 epochs, 2 cached
    views, students 6 epochs of batch 128. Each step prints the equivalent attncache command.
    About 4 minutes on 2 CPU cores (README states the measured time).
    """
    from attncache.pipeline.studies.demo import QUICK, DemoConfig, run_demo, table

    base = QUICK if quick else DemoConfig()
    cfg = DemoConfig(**{**base.__dict__, "out": out, "teacher_method": teacher_method, "progress": not quiet})
    summary = run_demo(cfg, echo=click.echo)
    click.echo("\n" + table(summary))
    click.echo(f"\nattention maps: {summary['figures']['attention']}\nlearning curves: {summary['figures']['curves']}")
    click.echo(f"demo finished in {summary['seconds']:.0f} s")
