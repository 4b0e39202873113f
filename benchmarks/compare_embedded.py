"""The README's compare figure, from scratch: real runs on the embedded data, seeds pooled.

    .venv/bin/attncache bench compare-embedded --out compare_out [--png docs/figures/compare_embedded.png]

Runs, as a user would type them (subprocesses of `attncache` itself, one core each):
`data synth` (2,048 train, 512 val) → `teacher pretrain` (supervised, the command's defaults) →
`precompute` of 2 train views with the demo's recipe and of the val split with `--recipe eval` →
for each seed, students `scratch`, `distill` (from the cache) and `copy` (the teacher's attention,
evaluated from the eval cache), all with the same student, batch, steps and `--eval-every 1` →
`attncache compare` of all runs into one PNG and its table (mean ± sample std over the seeds).
Every command is printed before it runs and written to OUT/commands.sh; a step whose output is
already there is skipped (a re-run resumes). Measured 2026-12-02 on the shared 2-core machine
(load average 3.5-4.8), one thread per command: 36 min wall (teacher 19, caches 1, each of the 9
students about 100 s); on a quiet core it is shorter. The README's table and figure are its output.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from attncache.benchmarks import HelpFormatter

BIN = Path(sys.executable).parent
RECIPE = "rrc(scale=(0.35,1.0))|flip|normalize"  # the demo's: the scratch student's too
STUDENT = ["--student", "vit_tiny_patch16_224", *[x for kv in ("img_size=32", "patch_size=4", "depth=6",
           "embed_dim=64", "num_heads=4") for x in ("--student-arg", kv)]]
MODES = ("scratch", "distill", "copy")


def run(args: list[str], log: Path, done: Path | None = None) -> str:
    """Print, record and run one `attncache` command (skipped when `done` exists); its stdout."""
    line = "attncache " + " ".join(shlex.quote(a) for a in args)
    with log.open("a") as f:
        f.write(line + "\n")
    if done is not None and done.exists():
        print(f"[skip, {done} exists] {line}", flush=True)
        return ""
    print(line, flush=True)
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "attncache"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{line} failed:\n{result.stderr[-3000:]}")
    print(f"    {time.perf_counter() - started:.0f} s", flush=True)
    return result.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="attncache bench compare-embedded", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for data, teacher, caches and runs")
    parser.add_argument("--png", default=None, help="the figure [default: OUT/compare.png]")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of student seeds")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of student modes")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per student")
    parser.add_argument("--num-train", type=int, default=2048, help="training images")
    parser.add_argument("--num-val", type=int, default=512, help="val images")
    parser.add_argument("--teacher-epochs", type=int, default=40, help="teacher pretrain epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.sh"
    log.write_text("")
    threads = ["--threads", str(args.threads)]
    data = out / "data"
    run(["data", "synth", str(data), "--num-train", str(args.num_train), "--num-val", str(args.num_val),
         "--num-pool", "0"], log, data / "synth.json")
    train = f"{data}/train-{{000000..{(args.num_train + 255) // 256 - 1:06d}}}.tar"
    val = f"{data}/val-{{000000..{(args.num_val + 255) // 256 - 1:06d}}}.tar"
    teacher = out / "teacher"
    run(["teacher", "pretrain", "--method", "supervised", "--data", train, "--eval-data", val, "--out", str(teacher),
         "--epochs", str(args.teacher_epochs), *threads, "--quiet"], log, teacher / "model.safetensors")
    cache, eval_cache = out / "cache.zarr", out / "eval.zarr"
    for store, shards, views, recipe in ((cache, train, 2, RECIPE), (eval_cache, val, 1, "eval")):
        run(["precompute", "--data", shards, "--teacher", str(teacher), "--out", str(store), "--views", str(views),
             "--recipe", recipe, "--ray", "none", "--workers", "0", *threads, "--quiet"], log)  # resumes itself
    sources = {"scratch": ["--recipe", RECIPE], "distill": ["--cache", str(cache)],
               "copy": ["--cache", str(cache), "--eval-cache", str(eval_cache)]}
    runs = []
    for mode in args.modes.split(","):  # all seeds of a mode before the next mode
        for seed in args.seeds.split(","):
            run_dir = out / "runs" / f"{mode}-s{seed}"
            runs.append(str(run_dir))
            run(["train", "--data", train, "--mode", mode, *sources[mode], *STUDENT, "--epochs", str(args.epochs),
                 "--batch-size", "128", "--lr", "2e-3", "--warmup-epochs", "1", "--eval-data", val, "--eval-every", "1",
                 "--seed", seed, "--workers", "0", *threads, "--quiet", "--out", str(run_dir)],
                log, run_dir / "model.safetensors")
    print(run(["compare", *runs, "--out", str(args.png or out / "compare.png")], log), end="")


if __name__ == "__main__":
    main()
