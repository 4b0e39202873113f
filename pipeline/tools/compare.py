"""`attncache compare`: several run directories side by side, seeds of one configuration pooled.

A run directory is what `train --out` writes: `student.json` (the recorded transfer spec and run
options) and `metrics.jsonl` (training rows with loss/ce/transfer per logged step, and eval rows
with val top-1). Runs of different modes are compared on the classification cross-entropy (`ce`):
the total loss adds `--distill-weight` x the transfer loss, so a distilled run's total is tens
of times a scratch run's and says nothing about which classifies better. Runs whose `student.json` differ only by the seed are one configuration drawn
several times; their final numbers are shown as mean ± sample std with n stated, since one seed's
number alone says nothing about how much a change helped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from attncache.pipeline._util import atomic
from attncache.pipeline._util.atomic import read_jsonl

SPEC_FILE, METRICS_FILE = "student.json", "metrics.jsonl"
# the paths in student.json that are the seed: the run's (batches, dropout) and the student's init
SEED_PATHS = (("run", "seed"), ("transfer", "student", "seed"))
METRICS = ("train_ce", "train_loss", "transfer_loss", "val_top1")


class NotARun(ValueError):
    """A path given to compare that is not a run directory (or cannot be read as one)."""


@dataclass(frozen=True)
class Run:
    name: str
    record: dict  # student.json
    rows: tuple  # metrics.jsonl records

    @property
    def seed(self):
        return self.record.get("run", {}).get("seed")

    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if "loss" in r]

    def eval_rows(self) -> list[dict]:
        return [r for r in self.rows if isinstance(r.get("eval"), dict) and "top1" in r["eval"]]

    def final(self) -> dict:
        """The last logged train cross-entropy, total loss and transfer loss and the last val top-1
        (None where absent)."""
        train = self.train_rows()
        transfer = [r["transfer"] for r in train if r.get("transfer") is not None]
        evals = self.eval_rows()
        return {"train_ce": _ce(train[-1]) if train else None, "train_loss": train[-1]["loss"] if train else None,
                "transfer_loss": transfer[-1] if transfer else None,
                "val_top1": evals[-1]["eval"]["top1"] if evals else None}


def _ce(row: dict) -> float:
    """A training row's cross-entropy (rows of runs before `ce` was logged: their loss)."""
    return row["ce"] if row.get("ce") is not None else row["loss"]


def load_run(path) -> Run:
    """The run in `path`, or NotARun naming it and what is missing."""
    path = Path(path)
    spec = path / SPEC_FILE
    if not path.is_dir():
        raise NotARun(f"{path}: not a run directory (no such directory)")
    if not spec.is_file():
        raise NotARun(f"{path}: not a run directory (no {SPEC_FILE}; `attncache train --out` writes one)")
    try:
        record = json.loads(spec.read_bytes())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        rows = read_jsonl(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise NotARun(f"{path}: cannot be read as a run ({exc})") from None
    return Run(path.name or str(path), record, tuple(rows))


def config_key(record: dict) -> str:
    """student.json with the seeds blanked: equal keys are runs that differ only by seed."""
    record = json.loads(json.dumps(record))
    for keys in SEED_PATHS:
        node = record
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            node[keys[-1]] = None
    return json.dumps(record, sort_keys=True)


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped by configuration, groups and runs in the order given."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_key(run.record), []).append(run)
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None for a single value, both None for none."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: json.dumps(value, sort_keys=True)}


# the recorded settings a label names first when they differ between configurations
LABEL_FIRST = ("transfer.mode", "transfer.cache", "transfer.student.name", "transfer.layers", "transfer.heads")


def group_labels(groups: list[list[Run]]) -> list[str]:
    """A short label per configuration: the recorded settings that tell the groups apart (`mode=copy`),
    as few as make the labels distinct, the ones a user changes most first; the run name for one group."""
    flats = [_flat(json.loads(config_key(group[0].record))) for group in groups]
    keys = sorted({k for f in flats for k in f if len({g.get(k) for g in flats}) > 1},
                  key=lambda k: (LABEL_FIRST.index(k) if k in LABEL_FIRST else len(LABEL_FIRST), k))
    chosen: list[str] = []
    for key in keys:
        if len({tuple(f.get(k) for k in chosen) for f in flats}) == len(flats):
            break
        chosen.append(key)
    if not chosen:
        return [group[0].name for group in groups]
    labels = []
    for f in flats:
        parts = []
        for key in chosen[:3]:
            value = json.loads(f.get(key, "null"))
            text = Path(value).name if key == "transfer.cache" and isinstance(value, str) else value
            parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
        labels.append(", ".join(parts))
    return labels


def summarize(groups: list[list[Run]]) -> list[dict]:
    """One row per configuration: its runs, seeds, n, and per metric mean/std/n over the runs that have it."""
    out = []
    for group in groups:
        finals = [run.final() for run in group]
        row = {"runs": [run.name for run in group], "seeds": [run.seed for run in group], "n": len(group)}
        for metric in METRICS:
            values = [f[metric] for f in finals if f[metric] is not None]
            mean, std = mean_std(values)
            row[metric] = {"mean": mean, "std": std, "n": len(values)}
        out.append(row)
    return out


def _cell(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f} (n=1)"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} (n={stat['n']})"


def table_lines(rows: list[dict]) -> list[str]:
    """The summary as an aligned text table (last logged values; std is the sample std over seeds)."""
    header = ["runs", "seeds", "train CE", "transfer loss", "val top-1"]
    body = [[", ".join(r["runs"]), ",".join(str(s) for s in r["seeds"]), _cell(r["train_ce"], 4),
             _cell(r["transfer_loss"], 4), _cell(r["val_top1"], 2)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]


def draw(groups: list[list[Run]], out, dpi: int = 110) -> Path:
    """Train cross-entropy, transfer loss and val top-1 against step in one PNG (written whole or not at all):
    one colour per configuration and one line style per seed, so the seeds of a configuration read
    as one band; the legend below the panels names each configuration once (with its seed count and
    final val top-1 mean) and each line style's seed. Panels with no data say so."""
    fig = figure(groups)
    atomic.save_figure(fig, out, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(out)


def figure(groups: list[list[Run]]):
    """The figure `draw` writes (a matplotlib Figure: axes 0..2 are the panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    titles = ("train cross-entropy", "transfer loss (attention, summed over layers)", "val top-1 (%)")
    handles = []
    for g, (group, label, row) in enumerate(zip(groups, group_labels(groups), summarize(groups))):
        colour = f"C{g % 10}"
        for s, run in enumerate(group):
            style = dict(linestyle=styles[s % 4], color=colour, linewidth=1.3)
            train = run.train_rows()
            axes[0].plot([r["step"] for r in train], [_ce(r) for r in train], **style)
            transfer = [r for r in train if r.get("transfer") is not None]
            if transfer:
                axes[1].plot([r["step"] for r in transfer], [r["transfer"] for r in transfer], **style)
            evals = run.eval_rows()
            if evals:
                axes[2].plot([r["step"] for r in evals], [r["eval"]["top1"] for r in evals], marker="o",
                             markersize=3, **style)
        val = row["val_top1"]
        final = f", val top-1 {val['mean']:.1f}" if val["mean"] is not None else ""
        handles.append(Line2D([], [], color=colour, linewidth=2.5, label=f"{label} ({len(group)} "
                              f"seed{'s' if len(group) > 1 else ''}{final})"))
    seeds = max(len(group) for group in groups)
    if seeds > 1:  # one grey handle per line style: which seed (by position in its group) it is
        names = ["/".join(dict.fromkeys(str(group[s].seed) for group in groups if len(group) > s))
                 for s in range(min(seeds, 4))]
        handles += [Line2D([], [], color="0.4", linestyle=styles[s], label=f"seed {names[s]}") for s in range(len(names))]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes)
    ncol = len(handles) if len(handles) <= 6 else 4  # up to 3 configurations and 3 seeds: one row
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(handles) - 1) // ncol), 1, 1))
    return fig
