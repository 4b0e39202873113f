"""`attncache compare RUN...`: learning curves of several runs in one PNG and a table, seeds pooled."""
from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write: train cross-entropy, transfer loss and val top-1 against step.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout instead of the table.")
def compare(runs, out, as_json):
    """Compare run directories (`train --out`): curves in one PNG, and a table of the last logged values.

    Runs whose recorded student.json differ only by --seed are grouped and shown as mean ± sample
    std, n stated. A path that is not a run directory is named in one line (exit 1 if none is a run).
    """
    from attncache.pipeline.tools.compare import NotARun, draw, group_runs, load_run, summarize, table_lines

    loaded, problems = [], []
    for path in runs:
        try:
            loaded.append(load_run(path))
        except NotARun as exc:
            problems.append(str(exc))
    for line in problems:
        click.echo(line, err=True)
    if not loaded:
        sys.exit(1)
    groups = group_runs(loaded)
    rows = summarize(groups)
    draw(groups, out)
    if as_json:
        click.echo(json.dumps({"groups": rows, "out": str(out), "not_runs": problems}))
    else:
        for line in table_lines(rows):
            click.echo(line)
        click.echo(out)
