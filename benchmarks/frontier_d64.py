"""The fidelity frontier of issue 14 on one teacher, every encoding in one run (KL, stored bytes per
sample-view, encode / decode MB/s), as a markdown table and a PNG:

    .venv/bin/python -m attncache.benchmarks.frontier_d64 --teacher /tmp/d64/teacher64 \\
        --data /tmp/d64/data/val-000000.tar --out docs/figures/fidelity_frontier_d64 [--samples 64]

It runs `attncache bench fidelity TEACHER --json --out-png OUT.png` over GRID (exact:fp16 and int8,
lowrank r = 2, 4, 8, 16 with fp16 / int8 / fp8 / int4 rows, and the shared-scale schemes of
pipeline/encodings/shared_scales.py at r = 4, 8, 16 with int8 and int4 rows) and writes OUT.json
(the report) and OUT.md (the table). Ranks above the teacher's head dim are left out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from attncache.benchmarks import HelpFormatter

BIN = Path(sys.executable).parent
ROWS = ("fp16", "int8", "fp8", "int4")
SCHEMES = ("token", "row-pow2", "token-pow2")
GRID = (["exact:fp16", "exact:int8"] + [f"lowrank:r={r}:{q}" for r in (16, 8, 4, 2) for q in ROWS]
        + [f"lowrank:r={r}:{q}:scale={s}" for r in (16, 8, 4) for q in ("int8", "int4") for s in SCHEMES])


def table(report: dict) -> str:
    lines = ["| encoding | bytes/sample-view | x smaller than exact:fp16 | mean KL | KL per layer | encode MB/s | "
             "decode MB/s |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in report["results"]:
        per_layer = " ".join(f"{v:.1e}" for v in r["kl_per_layer"])
        lines.append(f"| `{r['encoding']}` | {r['bytes_per_sample']:,.0f} | {r['x_smaller_than_exact_fp16']:.1f} | "
                     f"{r['kl_mean']:.2e} | {per_layer} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attncache.benchmarks.frontier_d64", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher directory (or timm name)")
    parser.add_argument("--data", required=True, help="val shards the teacher sees (eval recipe)")
    parser.add_argument("--out", required=True, type=Path, help="path stem for OUT.json, OUT.md, OUT.png")
    parser.add_argument("--samples", type=int, default=64, help="val images captured")
    parser.add_argument("--head-dim", type=int, default=64, help="ranks above it are left out")
    args, extra = parser.parse_known_args(argv)  # the rest goes to `bench fidelity` (e.g. --random-init)
    grid = [s for s in GRID if not s.startswith("lowrank") or int(s.split(":")[1][2:]) <= args.head_dim]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(BIN / "attncache"), "bench", "fidelity", args.teacher, *extra, "--data", args.data,
                             "--samples", str(args.samples), "--encodings", " ".join(grid), "--json",
                             "--out-png", str(args.out.with_suffix(".png"))], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    report = json.loads(result.stdout)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
