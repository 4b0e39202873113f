"""Student top-1 against bytes per sample-view, from a `bench students` output directory.

    .venv/bin/attncache bench students-plot OUT [OUT2 ...] --out docs/figures/students_vs_bytes_d64

Reads the runs of one or more `attncache bench students` --out directories from their own files
(each run-*/: student.json, metrics.jsonl; a run cut before its evaluation is left out) and the
caches' bytes from their students.json, so several invocations (more seeds, more arms) make one
table. Writes STEM.png (mean +- sample std over seeds per transfer arm against its cache's bytes
per sample-view, log x, one colour per transfer mode; each mode's exact:fp16 arm as a horizontal
band, scratch as a line), STEM.json (the points and every run) and STEM.md (the table, every seed).
A separate script so the plot can be redrawn from finished studies without re-running them.

The rule that picks an encoding, printed under the table: the smallest cache whose students are
within seed noise of exact:fp16 of the same transfer mode, |mean difference| <= the larger of the
two sample stds; with several modes, also the smallest within noise in every mode (what a default
must satisfy). Bytes are looked up by encoding name: join only directories of one teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from attncache.benchmarks import HelpFormatter

REFERENCE = "exact:fp16"


def caches_of(dirs: list[Path]) -> dict[str, dict]:
    """Real path of each cache named by the dirs' students.json -> its arm spec and bytes per sample-view."""
    out = {}
    for d in dirs:
        path = d / "students.json"
        if path.exists():
            for spec, c in json.loads(path.read_text())["caches"].items():
                out[os.path.realpath(c["path"])] = {"encoding": spec, "bytes_per_sample": c["bytes_per_sample"]}
    return out


def finished_runs(dirs: list[Path], caches: dict[str, dict]) -> list[dict]:
    """Every evaluated run-*/ of the dirs, read from its own files (student.json, metrics.jsonl), so
    runs of several `bench students` invocations (other seeds, other arms) join one table. A run that
    was cut before its evaluation is left out; of two runs of one arm and seed the first dir's is kept."""
    runs, seen = [], set()
    for d in dirs:
        for run in sorted(d.glob("run-*")):
            if not (run / "student.json").exists() or not (run / "metrics.jsonl").exists():
                continue
            record = json.loads((run / "student.json").read_text())
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            evals = [r for r in rows if "eval" in r]
            if not evals:
                continue
            transfer = record["transfer"]
            mode = transfer["mode"]
            if mode == "scratch":
                arm, enc = "scratch", None
            else:
                known = caches.get(os.path.realpath(transfer["cache"]))
                if known is None:
                    raise SystemExit(f"{run}: its cache {transfer['cache']} is named by no students.json of "
                                     f"{', '.join(map(str, dirs))}: give the `bench students` directory that built it")
                enc = known["encoding"]
                arm = f"{mode} {enc}"
            seed = record["run"]["seed"]
            if (arm, seed) in seen:
                continue
            seen.add((arm, seed))
            losses = [r["transfer"] for r in rows if r.get("transfer") is not None]
            runs.append({"arm": arm, "mode": mode, "encoding": enc, "seed": seed, "top1": evals[-1]["eval"]["top1"],
                         "steps": evals[-1]["step"], "threads": record["run"]["threads"], "dir": str(run),
                         "transfer_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None})
    return runs


def points(runs: list[dict], caches: dict[str, dict]) -> list[dict]:
    """One row per arm: mean, sample std, every seed's top-1, bytes per sample-view (None for scratch), steps."""
    size = {c["encoding"]: c["bytes_per_sample"] for c in caches.values()}
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        accs = [r["top1"] for r in mine]
        enc = mine[0]["encoding"]
        rows.append({"arm": arm, "mode": mine[0]["mode"], "encoding": enc, "bytes_per_sample": size.get(enc) if enc else None,
                     "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": [r["seed"] for r in mine], "top1": accs, "steps": sorted({r["steps"] for r in mine}),
                     "threads": sorted({r["threads"] for r in mine}),
                     "transfer_first_last": [r["transfer_first_last"] for r in mine]})
    return rows


def within_noise(row: dict, reference: dict) -> bool:
    """|mean difference| <= the larger sample std of the two arms."""
    return abs(row["mean"] - reference["mean"]) <= max(row["std"], reference["std"])


def reference_of(rows: list[dict], mode: str) -> dict | None:
    """The exact:fp16 arm of a transfer mode: each mode's arms are measured against their own."""
    return next((r for r in rows if r["encoding"] == REFERENCE and r["mode"] == mode), None)


ORDER = ("distill", "copy", "copy_q", "copy_k", "distill_q", "distill_k")


def modes_of(rows: list[dict]) -> list[str]:
    """The transfer modes of the rows, distill first (scratch is compared with the first one's
    exact:fp16), whatever order the run directories were read in."""
    found = set(r["mode"] for r in rows if r["encoding"])
    return sorted(found, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def pick(rows: list[dict], mode: str = "distill") -> dict | None:
    """The smallest arm of a transfer mode within seed noise of that mode's exact:fp16 (None without it)."""
    reference = reference_of(rows, mode)
    if reference is None:
        return None
    fits = [r for r in rows if r["encoding"] and r["mode"] == mode and within_noise(r, reference)]
    return min(fits, key=lambda r: r["bytes_per_sample"])


def pick_all(rows: list[dict]) -> dict | None:
    """The smallest encoding within seed noise of exact:fp16 in every transfer mode measured: what a
    default must satisfy (None when some mode has no exact:fp16 arm)."""
    modes = modes_of(rows)
    references = {m: reference_of(rows, m) for m in modes}
    if not modes or None in references.values():
        return None
    by_enc = {}
    for r in rows:
        if r["encoding"]:
            by_enc.setdefault(r["encoding"], {})[r["mode"]] = r
    fits = [arms[modes[0]] for arms in by_enc.values()
            if all(m in arms and within_noise(arms[m], references[m]) for m in modes)]
    return min(fits, key=lambda r: r["bytes_per_sample"]) if fits else None


def table(rows: list[dict]) -> str:
    """The markdown table, one column per seed of any arm ("-" where an arm lacks that seed), and the
    rule's picks, or why a mode has none."""
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines = ["| arm | bytes / sample-view | x smaller than exact:fp16 | "
             + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | mean - exact:fp16 | within noise "
             "| per seed - exact:fp16 (paired: same seed, same batches) |",
             "|---|---:|---:|" + "---:|" * len(seeds) + "---:|---:|---:|---|---|"]
    modes = modes_of(rows)
    for r in sorted(rows, key=lambda r: (modes.index(r["mode"]) if r["mode"] in modes else -1,
                                         -(r["bytes_per_sample"] or float("inf")))):
        # scratch is compared with the first mode's exact:fp16, a transfer arm with its own mode's
        reference = reference_of(rows, r["mode"] if r["encoding"] else (modes or ["distill"])[0])
        size = f"{r['bytes_per_sample']:,.0f}" if r["bytes_per_sample"] else "-"
        ratio = (f"{reference['bytes_per_sample'] / r['bytes_per_sample']:.1f}"
                 if reference and r["bytes_per_sample"] else "-")
        diff = f"{r['mean'] - reference['mean']:+.2f}" if reference else "-"
        noise = ("yes" if within_noise(r, reference) else "no") if reference else "-"
        name = (f"{r['mode']} `{r['encoding']}`" if len(modes) > 1 else f"`{r['encoding']}`") if r["encoding"] \
            else r["arm"]
        ref = dict(zip(reference["seeds"], reference["top1"])) if reference else {}
        paired = " ".join(f"{a - ref[seed]:+.2f}" for seed, a in zip(r["seeds"], r["top1"]) if seed in ref) or "-"
        mine = dict(zip(r["seeds"], r["top1"]))
        lines.append(f"| {name} | {size} | {ratio} | " + " | ".join(f"{mine[s]:.2f}" if s in mine else "-" for s in seeds)
                     + f" | {r['mean']:.2f} | {r['std']:.2f} | {diff} | {noise} | {paired} |")
    for mode in modes:
        chosen = pick(rows, mode)
        if reference_of(rows, mode) is None:
            lines += ["", f"No pick{f' ({mode})' if len(modes) > 1 else ''}: no {REFERENCE} arm of {mode} to "
                          "measure the others against."]
        elif chosen:
            lines += ["", f"Smallest within seed noise of {REFERENCE}" + (f" ({mode})" if len(modes) > 1 else "")
                      + f" (|mean difference| <= the larger std): `{chosen['encoding']}`, "
                      f"{chosen['bytes_per_sample']:,.0f} bytes per sample-view."]
    if len(modes) > 1 and (both := pick_all(rows)):
        lines += ["", f"Smallest within seed noise in every mode ({', '.join(modes)}): `{both['encoding']}`, "
                      f"{both['bytes_per_sample']:,.0f} bytes per sample-view."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attncache.pipeline._util import atomic

    fig, ax = plt.subplots(figsize=(12, 5.6))
    scratch = next((r for r in rows if r["arm"] == "scratch"), None)
    colours = {"distill": ("tab:blue", "o"), "copy": ("tab:green", "s"), "copy_q": ("tab:purple", "^")}
    modes = modes_of(rows)
    if scratch:
        ax.axhline(scratch["mean"], color="tab:red", ls="--", lw=1.2,
                   label=f"scratch (no teacher) {scratch['mean']:.1f} ± {scratch['std']:.1f}")
    key = []  # points sit close on a log axis: each is numbered, the numbers are keyed beside the axes
    encodings = sorted({r["encoding"] for r in rows if r["encoding"]},
                       key=lambda e: next(r["bytes_per_sample"] for r in rows if r["encoding"] == e))
    for i, enc in enumerate(encodings, 1):
        size = next(r["bytes_per_sample"] for r in rows if r["encoding"] == enc)
        key.append(f"{i}  {enc.replace('@', ' heads ')}  ({size:,.0f} B)")
    for mode in modes:
        colour, marker = colours.get(mode, ("black", "o"))
        reference = reference_of(rows, mode)
        if reference:
            ax.axhspan(reference["mean"] - reference["std"], reference["mean"] + reference["std"], color=colour,
                       alpha=0.12, label=f"{mode} {REFERENCE} mean ± std")
            ax.axhline(reference["mean"], color=colour, lw=1)
        mine = sorted((r for r in rows if r["encoding"] and r["mode"] == mode), key=lambda r: r["bytes_per_sample"])
        ax.errorbar([r["bytes_per_sample"] for r in mine], [r["mean"] for r in mine], yerr=[r["std"] for r in mine],
                    fmt=marker, color=colour, capsize=4, ms=5, label=f"{mode} students, mean ± std")
        for r in mine:
            ax.annotate(str(encodings.index(r["encoding"]) + 1), (r["bytes_per_sample"], r["mean"] + r["std"]),
                        fontsize=8, ha="center", xytext=(0, 4), textcoords="offset points")
    ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, fontsize=8, va="top", family="monospace")
    ax.set_xscale("log")
    ax.set(xlabel="cache bytes per sample-view (log)", ylabel="student val top-1 (%)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    low = min([r["mean"] - r["std"] for r in rows] + [float("inf")])
    high = max([r["mean"] + r["std"] for r in rows] + [float("-inf")])
    ax.set_ylim(low - 0.15 * (high - low + 1), high + 0.15 * (high - low + 1))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    fig.tight_layout()
    atomic.save_figure(fig, str(out), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+",
                        help="`bench students` --out directories (their students.json names the caches, their "
                             "run-*/ the runs)")
    parser.add_argument("--out", required=True, type=Path, help="path stem for OUT.png, OUT.json, OUT.md")
    parser.add_argument("--title", default=None, help="plot title [default: seeds and steps from the report]")
    args = parser.parse_args(argv)
    caches = caches_of(args.dirs)
    runs = finished_runs(args.dirs, caches)
    rows = points(runs, caches)
    if not rows:
        raise SystemExit(f"no finished run (run-*/ with an evaluation) under {', '.join(map(str, args.dirs))}")
    steps = sorted({s for r in rows for s in r["steps"]})
    seeds = max(len(r["seeds"]) for r in rows)
    title = args.title or f"students vs cache bytes: {seeds} seeds, {', '.join(map(str, steps))} steps"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chosen = pick_all(rows)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"dirs": [str(d) for d in args.dirs], "rule":
         "smallest encoding with |mean - exact:fp16 mean| <= max(std, exact:fp16 std) in every transfer mode",
         "chosen": chosen and chosen["encoding"],
         "chosen_per_mode": {m: (c := pick(rows, m)) and c["encoding"] for m in modes_of(rows)},
         "points": rows, "runs": runs}, indent=1))
    args.out.with_suffix(".md").write_text(table(rows))
    plot(rows, title, args.out.with_suffix(".png"))
    print(table(rows), end="")
    print(f"wrote {args.out.with_suffix('.png')}, .json, .md")


if __name__ == "__main__":
    main()
