"""RESULTS.md and plots from a study's results.json: means ± sample std over seeds, the fraction of
the scratch → fine-tune gap each transfer recovers (as the paper states it), cache vs online, and
the commands that produced every number."""
from __future__ import annotations

import statistics
from pathlib import Path

from attncache.pipeline._util import atomic


def arm_stats(results: list[dict]) -> dict[str, dict]:
    """Per arm: mean, sample std (0 for one seed), the per-seed values."""
    by_arm: dict[str, list[float]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(float(r["top1"]))
    return {arm: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v,
                  "n": len(v)} for arm, v in by_arm.items()}


def gap_recovered(stats: dict, arm: str, finetune: str = "finetune") -> float | None:
    """(arm - scratch) / (fine-tune - scratch): 77.8 % for copy on ImageNet with ViT-L in the paper."""
    if not all(a in stats for a in (arm, "scratch", finetune)):
        return None
    gap = stats[finetune]["mean"] - stats["scratch"]["mean"]
    return None if abs(gap) < 1e-9 else (stats[arm]["mean"] - stats["scratch"]["mean"]) / gap


def within_noise(stats: dict, a: str, b: str) -> tuple[float, float] | None:
    """(difference of means, its standard error from the per-seed stds): 'within seed noise' when
    |difference| <= 2 standard errors."""
    if a not in stats or b not in stats:
        return None
    sa, sb = stats[a], stats[b]
    se = ((sa["std"] ** 2) / sa["n"] + (sb["std"] ** 2) / sb["n"]) ** 0.5
    return sa["mean"] - sb["mean"], se


def _fmt(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def _table(stats: dict, arms: list[dict], group: str, extra: dict[str, str] | None = None) -> list[str]:
    lines = ["| arm | top-1 (mean ± std) | per seed |" + (" note |" if extra else ""),
             "|---|---:|---|" + ("---|" if extra else "")]
    for arm in arms:
        if arm["group"] != group or arm["name"] not in stats:
            continue
        s = stats[arm["name"]]
        row = f"| {arm['label'] or arm['name']} | {_fmt(s)} | {', '.join(f'{v:.2f}' for v in s['runs'])} |"
        if extra:
            row += f" {extra.get(arm['name'], '')} |"
        lines.append(row)
    return lines


def plot(report: dict, out_dir: Path) -> list[Path]:
    """Bar chart of the main arms with error bars; views ablation; learning curves of the main arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attncache.pipeline.tools.show import learning_curves

    stats = arm_stats(report["results"])
    labels = {a["name"]: a["label"] or a["name"] for a in report["arms"]} | {"ensemble": "distill + fine-tune ensemble"}
    written = []
    colours = {"scratch": "#999", "copy": "#4a90d9", "copy_q": "#6fb0e8", "distill": "#2c6fb3",
               "finetune": "#e08a3c", "ensemble": "#b85c1e", "sup-copy": "#5fb85f", "sup-distill": "#2e8b2e",
               "sup-finetune": "#a0522d"}
    main = [a for a in colours if a in stats]
    fig, ax = plt.subplots(figsize=(1.1 * len(main) + 1.5, 3.8))
    ax.bar(range(len(main)), [stats[a]["mean"] for a in main], yerr=[stats[a]["std"] for a in main], capsize=4,
           color=[colours[a] for a in main])
    short = {"sup-copy": "copy\n(supervised\nteacher)", "sup-distill": "distill\n(supervised\nteacher)",
             "sup-finetune": "fine-tune\n(supervised\nteacher)", "ensemble": "distill +\nfine-tune\nensemble",
             "distill": "distill\n(V=8)", "copy": "copy", "copy_q": "copy Q"}
    ax.set_xticks(range(len(main)), [short.get(a, labels[a]) for a in main], fontsize=8)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"attention transfer at small scale: MAE teacher (blue), supervised teacher (green); "
                 f"{len(report['config']['seeds'])} seeds, mean ± std", fontsize=9)
    ax.set_ylim(max(0, min(stats[a]["mean"] for a in main) - 15), None)
    fig.tight_layout()
    written.append(out_dir / "repro_main.png")
    atomic.save_figure(fig, written[-1], dpi=120)
    plt.close(fig)
    views = sorted(int(a["name"].removeprefix("distill-v")) for a in report["arms"]
                   if a["name"].startswith("distill-v") and a["name"] in stats)
    if views:
        top = max(report["config"]["views"])
        xs = views + [top]
        arms = [f"distill-v{v}" for v in views] + ["distill"]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.errorbar(xs, [stats[a]["mean"] for a in arms], yerr=[stats[a]["std"] for a in arms], marker="o",
                    capsize=4, label="cache, V views")
        if "distill-online" in stats:
            s = stats["distill-online"]
            ax.axhspan(s["mean"] - s["std"], s["mean"] + s["std"], color="#e08a3c", alpha=0.25)
            ax.axhline(s["mean"], color="#e08a3c", label="online teacher")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("cached views V")
        ax.set_ylabel("val top-1 (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "repro_views.png")
        atomic.save_figure(fig, written[-1], dpi=120)
        plt.close(fig)
    root = Path(report["config"]["out"])
    seed = report["config"]["seeds"][0]
    written.append(learning_curves({labels.get(a, a): root / "runs" / f"{a}-s{seed}"
                                    for a in ("scratch", "finetune", "copy", "distill")},
                                   out_dir / "repro_curves.png", dpi=120))
    return written


def write_results(report: dict, path: Path, figures_dir: Path, analysis: str = "") -> Path:
    stats = arm_stats(report["results"])
    arms = report["arms"] + [{"name": "ensemble", "group": "main", "label": "distill + fine-tune ensemble"}]
    cfg = report["config"]
    figures = plot(report, figures_dir)
    commands = {}
    for r in report["results"]:
        commands.setdefault(r["arm"], r["command"])
    lines = ["# RESULTS: attention transfer at small scale", "",
             f"Written by `attncache repro --out {cfg['out']}` (scale {cfg['scale']}, seeds "
             f"{', '.join(map(str, cfg['seeds']))}, student epochs {cfg['student_epochs']}, batch {cfg['batch_size']}, "
             f"teacher MAE epochs {cfg['teacher_epochs']}, cache encoding `{cfg['encoding']}`, device "
             f"`{cfg['device']}`, {cfg['jobs']} student run(s) at a time)."
             + (f" Wall time of this invocation: {report['seconds'] / 60:.1f} min." if report.get("seconds") else ""),
             "",
             "Top-1 on the 512-image val split of the embedded data set, mean ± sample std over seeds.", ""]
    if analysis:
        lines += [analysis.strip(), ""]
    lines += ["## Main table", ""] + _table(stats, arms, "main") + [""]
    for arm in ("copy", "copy_q", "distill", "ensemble"):
        frac = gap_recovered(stats, arm)
        if frac is not None:
            lines.append(f"- {arm}: recovers {100 * frac:.1f} % of the scratch → fine-tune gap "
                         f"({stats['scratch']['mean']:.2f} → {stats['finetune']['mean']:.2f}); the paper: 77.8 % for "
                         "copy with MAE ViT-L on ImageNet.")
    for arm in ("sup-copy", "sup-distill"):
        frac = gap_recovered(stats, arm, "sup-finetune")
        if frac is not None:
            lines.append(f"- {arm} (supervised teacher): recovers {100 * frac:.1f} % of the scratch → fine-tune gap "
                         f"({stats['scratch']['mean']:.2f} → {stats['sup-finetune']['mean']:.2f}).")
    cmp = within_noise(stats, "distill", "distill-online")
    if cmp:
        diff, se = cmp
        verdict = "within seed noise" if abs(diff) <= 2 * se else "NOT within seed noise"
        lines += ["", f"Cache vs online teacher: distill from the cache {_fmt(stats['distill'])}, online "
                      f"{_fmt(stats['distill-online'])}: difference {diff:+.2f}, standard error {se:.2f} → {verdict} "
                      "(|difference| ≤ 2 standard errors)."]
    for group, title in (("teachers", "Another teacher: supervised pre-training"),
                         ("views", "Cached views V vs the online teacher"), ("layers", "Which layers"),
                         ("heads", "How many heads"), ("shift", "Distribution shift")):
        if any(a["group"] == group for a in report["arms"]):
            ref = {"shift": ["distill", "finetune"], "teachers": ["scratch"]}.get(group, ["distill"])
            lines += ["", f"## {title}", ""] + _table(stats, arms, group)
            for name in ref:
                if name in stats:
                    lines.append(f"| (reference) {name} | {_fmt(stats[name])} | "
                                 f"{', '.join(f'{v:.2f}' for v in stats[name]['runs'])} |")
    lines += ["", "## Teachers and caches", ""]
    for name, t in report.get("teachers", {}).items():
        kind = t["method"]["name"]
        top1 = f", val top-1 {t['eval_top1']:.2f}" if t.get("eval_top1") is not None else ""
        lines.append(f"- teacher `{name}`: {kind}, {t['epochs']} epochs on {t['images']} "
                     f"{'unlabelled' if kind == 'mae' else 'labelled'} images, final loss "
                     f"{t['history'][-1]['loss']:.4f}{top1}, {t['seconds']:.0f} s")
    for name, c in report.get("caches", {}).items():
        lines.append(f"- cache `{name}`: {c['encoding']}, {c['views']} views, {c['bytes_per_sample']:,.0f} bytes "
                     "per sample-view")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.relative_to(path.parent) if p.is_relative_to(path.parent) else p})"
                                       for p in figures]
    lines += ["", "## Commands", "", "Every number above came from these commands (seed 0 shown; the other seeds "
              "differ only in `--seed` and the run directory).", "", "```"]
    for step in report["commands"]:
        if step["step"].startswith(("data", "teacher", "cache")):
            lines.append(step["command"])
    for arm, command in commands.items():
        lines.append(command)
    lines += ["```", ""]
    atomic.write_text(path, "\n".join(lines))
    return path
