"""Load: `attncache precompute --ray local` over 20 000 synthetic samples finishes with bounded memory.

The CLI runs as a user starts it; this test samples the resident memory of every process it starts
(the driver, Ray's own processes, the teacher actors) from /proc four times a second, next to the
number of units done, and requires that the actors' memory does not grow with the units they have
processed. The numbers go to stdout (`pytest -s`) and, as JSON, to `load_report.json` in tmp_path;
BENCHMARKS.md ("Load: 20 000 samples on local Ray") quotes a run.
"""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from relhelp import cli_args, env, noise_shards

pytestmark = pytest.mark.slow

SAMPLES, SHARD = 20_000, 100
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--model-arg", "img_size=32", "--model-arg",
           "patch_size=8", "--model-arg", "depth=2", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def _memory(pid: int) -> tuple[str, int, int] | None:
    """(command line, VmRSS, VmHWM) in bytes, or None if the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    kb = {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", status, re.M)}
    return (cmd, kb.get("VmRSS", 0), kb.get("VmHWM", 0)) if kb else None


def _kind(cmd: str, pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    if "UnitWorker" in cmd:
        return "actor"
    return "ray"


def test_twenty_thousand_samples_on_local_ray_with_bounded_memory(tmp_path):
    started = time.perf_counter()
    data = noise_shards(tmp_path / "d", SAMPLES, shard_size=SHARD, seed=0, classes=10)
    synth_s = time.perf_counter() - started
    out = tmp_path / "load.zarr"
    units_total = SAMPLES // SHARD
    proc = subprocess.Popen(cli_args("precompute", "--data", data, *TEACHER, "--out", out, "--ray", "local",
                                     "--threads", "1", "--batch-size", "125", "--quiet"),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples, peak = [], {}  # (seconds, units done, {pid: (kind, rss)}), and the highest VmHWM per kind
    t0 = time.perf_counter()
    while proc.poll() is None:
        procs = {}
        for pid in _descendants(proc.pid):
            found = _memory(pid)
            if found:
                kind = _kind(found[0], pid, proc.pid)
                procs[pid] = (kind, found[1])
                peak[kind] = max(peak.get(kind, 0), found[2])
        samples.append((time.perf_counter() - t0, len(list(out.glob("units/0/*.json"))), procs))
        time.sleep(0.25)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    assert f"samples written: {SAMPLES}   skipped: 0" in stdout
    throughput = float(re.search(r"throughput: ([\d.]+) images/s", stdout).group(1))

    # per actor: resident memory against units done, from the time a quarter of the units were done
    trends = {}
    actors = {pid for _, _, procs in samples for pid, (kind, _) in procs.items() if kind == "actor"}
    for pid in actors:
        points = [(units, procs[pid][1]) for _, units, procs in samples
                  if pid in procs and units_total // 4 <= units < units_total]
        if len(points) < 8:
            continue
        units, rss = np.array(points, dtype=float).T
        slope = float(np.polyfit(units, rss, 1)[0]) if np.ptp(units) else 0.0
        trends[pid] = {"mb_per_unit": slope / 2**20, "rss_mb_at_quarter": rss[0] / 2**20,
                       "rss_mb_at_end": rss[-1] / 2**20, "units_span": [int(units[0]), int(units[-1])]}
    total_rss = max(sum(r for _, r in procs.values()) for _, _, procs in samples)
    report = {"samples": SAMPLES, "units": units_total, "images_per_s": throughput,
              "wall_s": round(samples[-1][0], 1), "synth_s": round(synth_s, 1), "actors": len(actors),
              "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in peak.items()},
              "peak_total_rss_mb": round(total_rss / 2**20, 1), "actor_trends": list(trends.values())}
    (tmp_path / "load_report.json").write_text(json.dumps(report, indent=1))
    print("\nLOAD REPORT " + json.dumps(report))
    assert actors and trends, "no teacher actor was sampled"
    for trend in trends.values():
        # measured 0.02-0.03 MB per unit on a quiet machine, but 0.11 once in a clean-clone CI run
        # (allocator settling); keeping one unit's images alive (100 x 3 x 32 x 32 float32 = 1.2 MB) is
        # far above 0.3. A leak of only a unit's factors (about 0.12 MB) is within that noise.
        assert trend["mb_per_unit"] < 0.3, report
        # clean-clone CI (2026-11-25) saw 24.0 MB over the last 150 units, a quiet machine 3 MB: unexplained;
        # one unit's images kept alive would be 180 MB here
        assert trend["rss_mb_at_end"] - trend["rss_mb_at_quarter"] < 48, report
    assert peak["actor"] < 1024 * 2**20 and peak["driver"] < 1024 * 2**20, report
