"""Student accuracy at equal steps: scratch against attention distillation from caches, several seeds.

    .venv/bin/attncache bench students --data 'DIR/train-{000000..000007}.tar' --val DIR/val-000000.tar \\
        --teacher TEACHER_DIR --out OUT [--encodings exact:fp16,lowrank:r=2:int4] [--seeds 0,1,2] \\
        [--epochs 5] [--views 2] [--modes distill,copy] [--recipe 'rrc(scale=(0.35,1.0))|flip|normalize'] [--student-arg K=V ...]

Precomputes one cache per encoding (reused when present: precompute resumes), then trains, for each
seed, a scratch student and one distilled student per cache, all with the same student, batch,
steps, recipe and seed, through `attncache train` itself (subprocesses, as users run it; a finished
run directory is resumed, so a re-run with the same options only evaluates it again). Prints and
writes (OUT/students.json, OUT/students.md) the top-1 on the val split per run and the mean and
sample standard deviation per arm. The cache's bytes per sample-view are reported beside, and per
distilled run the transfer loss of its first and last logged steps (did distillation act?).

`--modes distill,copy` adds, per cache, copy students (`train --mode copy`: the student's transferred
layers use the decoded teacher maps in their forward, so the encoding error enters the forward, not
only a loss). A copy student is evaluated with the teacher's maps of the val images too: per encoding
the bench precomputes an eval cache of the val split (`--recipe eval`, one view, precompute's
default layers, as the train cache) and passes it as `train --eval-cache`. Copy modes transfer whole
layers, so a head-subset arm (`@H+H`) with `--modes ...copy...` is refused before any work.

A head subset is an encoding with `@HEADS` (heads joined by '+'): `lowrank:r=8:int8@0+2` caches only
heads 0 and 2 (`precompute --heads 0,2`, so its bytes are those of the subset) and its students
transfer only those heads (`train --heads 0,2`). `bench students-plot OUT` draws top-1 against bytes.

A second invocation into the same --out (more seeds, other encodings or modes) adds its runs to the
report there, whose caches and runs of earlier invocations stay (a re-run arm and seed replaces its
own record); one whose shared settings (data, val, teacher, epochs, views, batch size, lr, distill
weight, layers, recipe, student) differ is refused before any work. Encodings, seeds and modes are
checked before any cache is built.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from attncache.benchmarks import HelpFormatter
from attncache.pipeline.encodings.default import DEFAULT_ENCODING  # imports nothing: the help stays torch-free

BIN = Path(sys.executable).parent
STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=4",
           "--student-arg", "depth=6", "--student-arg", "embed_dim=96", "--student-arg", "num_heads=4"]


def attncache(*args: str) -> str:
    result = subprocess.run([str(BIN / "attncache"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"attncache {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def parse_arm(spec: str) -> tuple[str, str | None]:
    """'ENC' or 'ENC@H+H' -> (encoding, heads as precompute/train take them: 'H,H') ."""
    enc, _, heads = spec.partition("@")
    return enc, (",".join(heads.split("+")) if heads else None)


MODES = ("distill", "copy")


def cache_name(spec: str, split: str = "train") -> str:
    """The cache directory of an arm: encoding spelled for a path, then '-headsH+H' for a subset, and
    '-val' for the eval cache of the val split (copy students)."""
    enc, _, heads = spec.partition("@")
    return (f"cache-{enc.replace(':', '_').replace('=', '')}" + (f"-heads{heads}" if heads else "")
            + ("-val" if split == "val" else "") + ".zarr")


def parse_encodings(text: str) -> list[str]:
    """'exact:fp16, lowrank:r=4x6,16x6:int8' -> ['exact:fp16', 'lowrank:r=4x6,16x6:int8']: items are
    trimmed, a piece that does not start with a letter continues the previous item's rank schedule
    (`r=4,8` and `r=4x6,16x6`), and an item given twice is refused, before any cache is built."""
    items: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if items and not piece[0].isalpha():
            items[-1] += "," + piece
        else:
            items.append(piece)
    if twice := sorted({e for e in items if items.count(e) > 1}):
        raise SystemExit(f"--encodings: {', '.join(twice)} given twice")
    return items


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a non-integer, a seed outside train's 0..2**32-1, a repeated seed or an
    empty list is refused before any cache is built."""
    seeds = []
    for item in (s.strip() for s in text.split(",")):
        try:
            seed = int(item)
        except ValueError:
            raise SystemExit(f"--seeds: {text!r}: {item!r} is not an integer; give e.g. 0,1,2") from None
        if not 0 <= seed < 2 ** 32:
            raise SystemExit(f"--seeds: {seed} is outside 0..4294967295 (train's --seed range)")
        if seed in seeds:
            raise SystemExit(f"--seeds: {seed} given twice (one run per arm and seed)")
        seeds.append(seed)
    return seeds


# The settings every run of one --out shares: a second invocation into the same --out (more seeds,
# other arms, another mode) must not mix students of another recipe into one table.
SHARED = ("data", "val", "teacher", "epochs", "views", "batch_size", "lr", "distill_weight", "layers", "recipe",
          "student_arg")


def settings(args: argparse.Namespace) -> dict[str, str]:
    """The invocation's options as the report records them (and a later invocation compares them)."""
    return {k: str(v) for k, v in vars(args).items()}


def earlier_report(out: Path, args: argparse.Namespace) -> dict:
    """The students.json of an earlier invocation into this --out (empty when none), refused when it
    was made with other shared settings."""
    path = out / "students.json"
    if not path.exists():
        return {"caches": {}, "runs": []}
    try:
        report = json.loads(path.read_text())
    except ValueError as bad:  # written whole by this bench: an edit or another tool cut it
        raise SystemExit(f"{path}: not a `bench students` report ({bad}): restore it, or give another --out") from None
    before, now = report.get("args", {}), settings(args)
    if differ := [k for k in SHARED if before.get(k) != now[k]]:
        raise SystemExit(f"{path}: an earlier `bench students` into this --out used other settings ("
                         + "; ".join(f"--{k.replace('_', '-')} {before.get(k)} there, {now[k]} now" for k in differ)
                         + "): give another --out, or the same settings")
    return report


def parse_modes(text: str) -> list[str]:
    """'distill,copy' -> ['distill', 'copy']; an unknown or empty list is refused before any work."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: {text!r}: give a comma list of {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def arm_args(mode: str, cache: dict, layers: str | None, distill_weight: str) -> list[str]:
    """`attncache train` options of one transfer arm: its mode, cache (and eval cache for copy),
    transferred layers and heads."""
    args = ["--mode", mode, "--cache", cache["path"]]
    if mode == "distill":
        args += ["--distill-weight", distill_weight]
    else:
        args += ["--eval-cache", cache["eval_path"]]
    if layers:
        args += ["--layers", layers]
    if cache["heads"]:
        args += ["--heads", cache["heads"]]
    return args


def run_name(arm: str, seed: int) -> str:
    """The run directory of an arm and seed: ('distill lowrank:r=8:int8@0', 1) ->
    'run-distill-lowrank_r8_int8-heads0-s1' (a re-run finds it there and resumes it)."""
    return f"run-{arm.replace(' ', '-').replace(':', '_').replace('=', '').replace('@', '-heads')}-s{seed}"


def transfer_losses(run_dir: Path) -> list[float] | None:
    """The transfer loss of the run's first and last logged training steps (metrics.jsonl), or None."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r["transfer"] for r in rows if r.get("transfer") is not None]
    return [round(values[0], 4), round(values[-1], 4)] if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"attncache bench {Path(__file__).stem.replace('_', '-')}",
                                     description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="training shards (brace pattern)")
    parser.add_argument("--val", required=True, help="val shards")
    parser.add_argument("--teacher", required=True, help="teacher name or directory")
    parser.add_argument("--out", required=True, type=Path, help="directory for caches, runs and the report")
    parser.add_argument("--encodings", default=f"exact:fp16,{DEFAULT_ENCODING}",
                        help="comma list of encodings, one cache each (a rank schedule such as lowrank:r=4x6,16x6:int8 keeps "
                             "its commas); ENC@H+H caches and transfers heads H only")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of distinct seeds, each 0..2**32-1")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per student")
    parser.add_argument("--views", type=int, default=2, help="cached views per cache")
    parser.add_argument("--batch-size", type=int, default=128, help="student batch size")
    parser.add_argument("--lr", default="2e-3", help="peak learning rate")
    parser.add_argument("--distill-weight", default="3.0", help="weight of the attention loss")
    parser.add_argument("--layers", default=None,
                        help="Transferred layers, given to `train` (caches hold precompute's default layers, all but "
                             "the last 3) [default: trainer's, all but last 3].")
    parser.add_argument("--recipe", default="rrc(scale=(0.35,1.0))|flip|normalize",
                        help="augmentation recipe of caches and scratch students")
    parser.add_argument("--workers", default="1", help="loader workers")
    parser.add_argument("--ray", default="local", help="precompute's --ray (none: no Ray cluster, in this process)")
    parser.add_argument("--threads", default="2", help="torch threads of each `attncache train` (its --threads)")
    parser.add_argument("--student-arg", action="append", default=None, metavar="K=V",
                        help="timm argument of the student, repeatable [default: the teacher-sized tiny ViT: "
                             f"{' '.join(STUDENT[3::2])}]")
    parser.add_argument("--no-scratch", action="store_true", help="skip the scratch arm")
    parser.add_argument("--modes", default="distill",
                        help="comma list of transfer modes per cache: distill, copy (copy also caches the val split)")
    args = parser.parse_args(argv)
    modes = parse_modes(args.modes)
    encodings = parse_encodings(args.encodings)
    seeds = parse_seeds(args.seeds)
    if not encodings and args.no_scratch:
        raise SystemExit("nothing to run: --encodings is empty and --no-scratch drops the scratch arm")
    if "copy" in modes and (subsets := [e for e in encodings if "@" in e]):
        raise SystemExit(f"--modes copy: copy students transfer whole layers; drop the head-subset arms "
                         f"{', '.join(subsets)} or run them with --modes distill")
    student = STUDENT if not args.student_arg else [STUDENT[0], STUDENT[1]] + [
        x for kv in args.student_arg for x in ("--student-arg", kv)]
    earlier = earlier_report(args.out, args)
    args.out.mkdir(parents=True, exist_ok=True)
    caches = {}
    for spec in encodings:
        enc, heads = parse_arm(spec)
        cache = args.out / cache_name(spec)
        started = time.perf_counter()
        attncache("precompute", "--data", args.data, "--out", str(cache), "--teacher", args.teacher, "--views",
                  str(args.views), "--recipe", args.recipe, "--encoding", enc, "--workers", args.workers, "--quiet",
                  "--ray", args.ray, *(["--heads", heads] if heads else []))
        info = json.loads(attncache("inspect", str(cache), "--json"))
        caches[spec] = {"path": str(cache), "bytes_per_sample": info["bytes_per_sample"], "heads": heads,
                        "precompute_s": round(time.perf_counter() - started, 1)}
        if "copy" in modes:
            val = args.out / cache_name(spec, "val")
            attncache("precompute", "--data", args.val, "--out", str(val), "--teacher", args.teacher, "--views", "1",
                      "--recipe", "eval", "--encoding", enc, "--workers", args.workers, "--quiet", "--ray", args.ray,
                      *(["--heads", heads] if heads else []))
            caches[spec]["eval_path"] = str(val)
        print(f"cache {spec}: {info['bytes_per_sample']:,.0f} bytes per sample-view", flush=True)
    arms = {} if args.no_scratch else {"scratch": ["--mode", "scratch", "--recipe", args.recipe]}
    for spec, c in caches.items():
        for mode in modes:
            arms[f"{mode} {spec}"] = arm_args(mode, c, args.layers, args.distill_weight)
    # an earlier invocation's caches and runs stay (students-plot finds each run's cache here); a run of
    # this invocation replaces the earlier record of its arm and seed. The report is rewritten whole
    # (atomically) after the caches and after every run, so a killed invocation leaves one that names
    # every cache its finished runs used.
    caches = {**earlier["caches"], **caches}
    runs = list(earlier["runs"])
    save_report(args, caches, runs)
    for seed in seeds:
        for arm, extra in arms.items():
            out = args.out / run_name(arm, seed)
            started = time.perf_counter()
            evaluation = [] if "--eval-cache" in extra else ["--eval-data", args.val]
            summary = json.loads(attncache("train", "--data", args.data, *student, "--out", str(out), "--epochs",
                                           str(args.epochs), "--batch-size", str(args.batch_size), "--lr", args.lr,
                                           "--warmup-epochs", "1", "--seed", str(seed), *evaluation,
                                           "--workers", args.workers, "--threads", args.threads, "--quiet", "--json",
                                           *extra).splitlines()[-1])
            transfer = transfer_losses(out)
            runs = [r for r in runs if (r["arm"], r["seed"]) != (arm, seed)]
            runs.append({"arm": arm, "seed": seed, "top1": summary["eval"]["top1"], "steps": summary["steps"],
                         "seconds": round(time.perf_counter() - started, 1), "transfer_first_last": transfer,
                         "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                         "load_1min": round(os.getloadavg()[0], 2)})
            print(f"seed {seed} {arm}: top1 {summary['eval']['top1']:.2f} ({summary['steps']} steps, transfer loss "
                  f"{transfer})", flush=True)
            save_report(args, caches, runs)
    print(report_table(caches, runs))


def save_report(args: argparse.Namespace, caches: dict, runs: list[dict]) -> None:
    """students.json (settings, caches, runs, per-arm table) and students.md, each written whole."""
    from attncache.pipeline._util import atomic

    table = arm_table(runs)
    atomic.write_json(args.out / "students.json", {"args": settings(args), "caches": caches, "runs": runs,
                                                   "table": table})
    atomic.write_text(args.out / "students.md", report_table(caches, runs) + "\n")


def arm_table(runs: list[dict]) -> dict:
    """Per arm: mean and sample std of top-1 over its seeds, and each seed's top-1 in seed order."""
    table = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        accs = [r["top1"] for r in sorted(runs, key=lambda r: r["seed"]) if r["arm"] == arm]
        table[arm] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "runs": accs}
    return table


def report_table(caches: dict, runs: list[dict]) -> str:
    lines = ["| arm | top-1 mean | std | runs | cache bytes per sample-view |", "|---|---:|---:|---|---:|"]
    for arm, row in arm_table(runs).items():
        spec = arm.partition(" ")[2]
        size = f"{caches[spec]['bytes_per_sample']:,.0f}" if spec in caches else "-"
        lines.append(f"| {arm} | {row['mean']:.2f} | {row['std']:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in row['runs'])} | {size} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
