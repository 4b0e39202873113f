"""Student top-1 against bytes per sample-view, from a `bench students` output directory.

    .venv/bin/attncache bench students-plot /tmp/stud14/run --out docs/figures/students_vs_bytes_d64

Reads OUT/students.json (written by `attncache bench students`) and writes STEM.png (mean +- sample
std over seeds per distilled arm against its cache's bytes per sample-view, log x; the exact:fp16
arm as a horizontal band, scratch as a line), STEM.json (the points) and STEM.md (the table, every
seed). A separate script so the plot can be redrawn from a finished study without re-running it.

The rule that picks an encoding, printed under the table: the smallest cache whose students are
within seed noise of exact:fp16, |mean difference| <= the larger of the two sample stds.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from attncache.benchmarks import HelpFormatter

REFERENCE = "exact:fp16"


def points(report: dict) -> list[dict]:
    """One row per arm: mean, sample std, every seed's top-1, bytes per sample-view (None for scratch), steps."""
    rows = []
    for arm, row in report["table"].items():
        spec = arm.removeprefix("distill ")
        runs = sorted((r for r in report["runs"] if r["arm"] == arm), key=lambda r: r["seed"])
        rows.append({"arm": arm, "encoding": spec if spec in report["caches"] else None,
                     "bytes_per_sample": report["caches"][spec]["bytes_per_sample"] if spec in report["caches"] else None,
                     "mean": row["mean"], "std": row["std"], "seeds": [r["seed"] for r in runs],
                     "top1": [r["top1"] for r in runs], "steps": sorted({r["steps"] for r in runs}),
                     "transfer_first_last": [r["transfer_first_last"] for r in runs]})
    return rows


def within_noise(row: dict, reference: dict) -> bool:
    """|mean difference| <= the larger sample std of the two arms."""
    return abs(row["mean"] - reference["mean"]) <= max(row["std"], reference["std"])


def pick(rows: list[dict]) -> dict | None:
    """The smallest distilled arm within seed noise of exact:fp16 (None without that arm)."""
    reference = next((r for r in rows if r["encoding"] == REFERENCE), None)
    if reference is None:
        return None
    fits = [r for r in rows if r["encoding"] and within_noise(r, reference)]
    return min(fits, key=lambda r: r["bytes_per_sample"])


def table(rows: list[dict]) -> str:
    reference = next((r for r in rows if r["encoding"] == REFERENCE), None)
    seeds = max((r["seeds"] for r in rows), key=len)
    lines = ["| arm | bytes / sample-view | x smaller than exact:fp16 | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | mean - exact:fp16 | within noise |",
             "|---|---:|---:|" + "---:|" * len(seeds) + "---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: -(r["bytes_per_sample"] or float("inf"))):
        size = f"{r['bytes_per_sample']:,.0f}" if r["bytes_per_sample"] else "-"
        ratio = (f"{reference['bytes_per_sample'] / r['bytes_per_sample']:.1f}"
                 if reference and r["bytes_per_sample"] else "-")
        diff = f"{r['mean'] - reference['mean']:+.2f}" if reference else "-"
        noise = ("yes" if within_noise(r, reference) else "no") if reference else "-"
        name = f"`{r['encoding']}`" if r["encoding"] else r["arm"]
        lines.append(f"| {name} | {size} | {ratio} | " + " | ".join(f"{a:.2f}" for a in r["top1"])
                     + f" | {r['mean']:.2f} | {r['std']:.2f} | {diff} | {noise} |")
    chosen = pick(rows)
    if chosen:
        lines += ["", f"Smallest within seed noise of {REFERENCE} (|mean difference| <= the larger std): "
                      f"`{chosen['encoding']}`, {chosen['bytes_per_sample']:,.0f} bytes per sample-view."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attncache.pipeline._util import atomic

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    reference = next((r for r in rows if r["encoding"] == REFERENCE), None)
    scratch = next((r for r in rows if r["arm"] == "scratch"), None)
    if reference:
        ax.axhspan(reference["mean"] - reference["std"], reference["mean"] + reference["std"], color="tab:blue",
                   alpha=0.15, label=f"{REFERENCE} mean ± std")
        ax.axhline(reference["mean"], color="tab:blue", lw=1)
    if scratch:
        ax.axhline(scratch["mean"], color="tab:red", ls="--", lw=1.2,
                   label=f"scratch (no teacher) {scratch['mean']:.1f} ± {scratch['std']:.1f}")
    distilled = sorted((r for r in rows if r["encoding"]), key=lambda r: r["bytes_per_sample"])
    ax.errorbar([r["bytes_per_sample"] for r in distilled], [r["mean"] for r in distilled],
                yerr=[r["std"] for r in distilled], fmt="o", color="black", capsize=4, ms=5,
                label="distilled students, mean ± std")
    for i, r in enumerate(distilled):
        ax.annotate(r["encoding"], (r["bytes_per_sample"], r["mean"]), fontsize=8, rotation=0,
                    xytext=(6, 10 if i % 2 else -14), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="cache bytes per sample-view (log)", ylabel="student val top-1 (%)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic.save_figure(fig, str(out), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("dir", type=Path, help="a `bench students` --out directory (its students.json)")
    parser.add_argument("--out", required=True, type=Path, help="path stem for OUT.png, OUT.json, OUT.md")
    parser.add_argument("--title", default=None, help="plot title [default: seeds and steps from the report]")
    args = parser.parse_args(argv)
    report = json.loads((args.dir / "students.json").read_text())
    rows = points(report)
    steps = sorted({s for r in rows for s in r["steps"]})
    seeds = max(len(r["seeds"]) for r in rows)
    title = args.title or (f"students vs cache bytes: {seeds} seeds, {', '.join(map(str, steps))} steps of "
                           f"{report['args']['batch_size']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chosen = pick(rows)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"source": str(args.dir / "students.json"), "args": report["args"], "rule":
         "smallest encoding with |mean - exact:fp16 mean| <= max(std, exact:fp16 std)",
         "chosen": chosen and chosen["encoding"], "points": rows}, indent=1))
    args.out.with_suffix(".md").write_text(table(rows))
    plot(rows, title, args.out.with_suffix(".png"))
    print(table(rows), end="")
    print(f"wrote {args.out.with_suffix('.png')}, .json, .md")


if __name__ == "__main__":
    main()
