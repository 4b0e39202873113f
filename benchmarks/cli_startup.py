"""How long `attncache --help` and every sub-command's `--help` take, as whole processes (issue 16 item 6).

    .venv/bin/python -m attncache.benchmarks.cli_startup [--runs 5] [--json out.json]

Each page is rendered by a fresh `python -m attncache.cli.main PATH --help` (what a user's shell
pays: interpreter start, imports, click), once as a warm-up and then --runs times; the median wall
and CPU (user + sys, from the OS's accounting of the finished child) seconds are printed per page.
The pages are found by reading each group's list of commands, so a new command is measured without listing it.
Set PYTHONPATH to measure another checkout (the figures in BENCHMARKS.md compare against 0b09c8e).
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


def help_page(path: list[str]) -> str:
    return subprocess.run([sys.executable, "-m", "attncache.cli.main", *path, "--help"], capture_output=True,
                          text=True, check=True).stdout


def command_paths() -> list[list[str]]:
    """[] for the group itself, then every command and sub-command, depth first, in listed order: read
    from the pages' "Commands:" sections (benchmarks sit below cli and do not import it)."""
    paths: list[list[str]] = []

    def walk(path: list[str]) -> None:
        paths.append(path)
        lines = help_page(path).splitlines()
        if "Commands:" not in lines:
            return
        for line in lines[lines.index("Commands:") + 1:]:
            if not line.startswith("  ") or line.startswith("   "):
                break
            walk([*path, line.split()[0]])

    walk([])
    return paths


def time_once(argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one run of `argv`, its output thrown away."""
    before = os.times()
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def measure(path: list[str], runs: int) -> dict:
    argv = [sys.executable, "-m", "attncache.cli.main", *path, "--help"]
    time_once(argv)  # warm-up: the page cache, .pyc files
    walls, cpus = zip(*(time_once(argv) for _ in range(runs)))
    return {"command": " ".join(["attncache", *path, "--help"]), "runs": runs,
            "median_wall_s": round(statistics.median(walls), 3), "max_wall_s": round(max(walls), 3),
            "median_cpu_s": round(statistics.median(cpus), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attncache.benchmarks.cli_startup", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="counted runs per page, after one warm-up")
    parser.add_argument("--only", default=None, help="comma list of pages to measure, e.g. ',train,bench train' "
                                                     "('' is `attncache --help`) [default: all]")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    paths = command_paths()
    if args.only is not None:
        wanted = {p.strip() for p in args.only.split(",")}
        paths = [p for p in paths if " ".join(p) in wanted]
    rows = []
    print(f"{'command':<44} {'median wall s':>14} {'max wall s':>11} {'median cpu s':>13}")
    for path in paths:
        row = measure(path, args.runs)
        rows.append(row)
        print(f"{row['command']:<44} {row['median_wall_s']:>14.3f} {row['max_wall_s']:>11.3f} "
              f"{row['median_cpu_s']:>13.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
