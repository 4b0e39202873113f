"""`attncache repro`: the paper's main findings at small scale, with error bars. Thin: parse, call."""
from __future__ import annotations

from pathlib import Path

import click

from attncache.cli import defaults
from attncache.cli import params as P

_R = defaults.Repro()
GROUPS = ("main", "teachers", "views", "layers", "heads", "shift")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma list of integers") from None


@click.command()
@click.option("--out", default="repro_out", show_default=True, type=click.Path(file_okay=False),
              help="Working directory: data, teachers, caches, runs (kept; a re-run resumes).")
@click.option("--scale", default=_R.scale, type=P.floats(0, 1000, low_open=True), show_default=True,
              help="Multiplies the training set (2048) and the pre-training pools (4096): >1 for larger machines.")
@click.option("--seeds", default=",".join(map(str, _R.seeds)), type=P.IntList(P.SEED), show_default=True, help="Student seeds.")
@click.option("--views", default=",".join(map(str, _R.views)), type=P.IntList(P.VIEWS), show_default=True,
              help="Cached views compared (the largest is the cache's V and the main arms').")
@click.option("--student-epochs", default=_R.student_epochs, type=P.EPOCHS, show_default=True, help="Epochs of every student.")
@click.option("--teacher-epochs", default=_R.teacher_epochs, type=P.EPOCHS, show_default=True, help="MAE pre-training epochs.")
@click.option("--supervised-epochs", default=_R.supervised_epochs, type=P.EPOCHS, show_default=True,
              help="Supervised teacher's epochs (group 'teachers').")
@click.option("--jobs", default=_R.jobs, type=P.ints(1, 256), show_default=True, help="Student runs at a time (for a GPU or many cores).")
@click.option("--batch-size", default=_R.batch_size, type=P.BATCH, show_default=True, help="Student batch size.")
@click.option("--lr", default=_R.lr, type=P.RATE, show_default=True, help="Student peak learning rate.")
@click.option("--encoding", default=_R.encoding, callback=P.encoding_callback, show_default=True, help="Encoding of the low-rank caches.")
@click.option("--groups", default=",".join(GROUPS), show_default=True,
              help=f"Which parts to run: {', '.join(GROUPS)} (main is always run).")
@click.option("--device", default=_R.device, show_default=True, help="Student training device (cpu, cuda).")
@click.option("--threads", type=P.THREADS, default=None, help="Torch threads per step [default: the commands' default].")
@click.option("--results", "results_path", default=None, type=click.Path(dir_okay=False),
              help="Where to write RESULTS.md [default: OUT/RESULTS.md].")
@click.option("--figures", "figures_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for the PNG plots [default: OUT/figures].")
@click.option("--analysis", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A markdown file whose text is put under the title of RESULTS.md.")
def repro(out, scale, seeds, views, student_epochs, teacher_epochs, supervised_epochs, jobs, batch_size, lr, encoding, groups, device,
          threads, results_path, figures_dir, analysis):
    """Reproduce the paper's study at small scale: synthetic data, MAE teachers, one cache per teacher,
    students for scratch / fine-tune / copy / copy-Q / distill / ensemble over several seeds, and the
    views, layers, heads and distribution-shift ablations. Writes RESULTS.md and plots.

    About 60-80 minutes on 2 CPU cores with the defaults (measured: see RESULTS.md); everything is
    resumable, so an interrupted study picks up where it stopped.
    """
    from attncache.pipeline.studies.repro import ReproConfig, StudyConflict, run_study
    from attncache.pipeline.studies.repro_report import write_results

    chosen = tuple(g for g in groups.split(",") if g.strip())
    unknown = sorted(set(chosen) - set(GROUPS))
    if unknown:
        raise click.BadParameter(f"unknown groups {unknown}; choose from {', '.join(GROUPS)}")
    cfg = ReproConfig(out=out, scale=scale, seeds=_ints(seeds), views=_ints(views), student_epochs=student_epochs,
                      teacher_epochs=teacher_epochs, supervised_epochs=supervised_epochs, jobs=jobs,
                      batch_size=batch_size, lr=lr, encoding=encoding,
                      groups=tuple(dict.fromkeys(("main", *chosen))), device=device, threads=threads)
    if not cfg.seeds or not cfg.views:
        raise click.BadParameter("--seeds and --views need at least one value each")
    try:
        report = run_study(cfg)
    except StudyConflict as conflict:
        raise click.ClickException(str(conflict)) from None
    results = Path(results_path) if results_path else Path(out) / "RESULTS.md"
    figures = Path(figures_dir) if figures_dir else Path(out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    text = Path(analysis).read_text() if analysis else ""
    written = write_results(report, results, figures, text)
    click.echo(f"study finished in {report['seconds'] / 60:.1f} min -> {written}")
