"""Stores made before the restructure (issue 13) keep working: the code of 1ff8d5b, the commit before
the package moved under one namespace, makes a store and trains on it; today's code opens it,
resumes it without redoing a unit, verifies it, trains bit-identically on it, and makes the same
bytes for the same job.

The old code is taken from this repository's own history (`git archive`), so the check needs no
copy of old code in the tree; a checkout without that commit (a shallow clone) skips it, saying so.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "1ff8d5b"  # issues 17 and 12 landed; the restructure of issue 13 starts after it

TEACHER = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--model-arg", "depth=4", "--model-arg",
           "embed_dim=48", "--model-arg", "img_size=32", "--model-arg", "num_heads=3", "--model-arg", "patch_size=8"]
STUDENT = ["--mode", "distill", "--student", "vit_tiny_patch16_224", "--student-arg", "depth=4", "--student-arg",
           "embed_dim=48", "--student-arg", "img_size=32", "--student-arg", "num_heads=3", "--student-arg",
           "patch_size=8", "--max-steps", "4", "--batch-size", "16", "--workers", "0", "--threads", "1",
           "--layers", ":", "--quiet"]


def _old_tree(tmp_path: Path) -> Path:
    have = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BEFORE}^{{commit}}"], capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this checkout (shallow clone): the old code cannot be rebuilt")
    tree = tmp_path / "old"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "pipeline", "cli", "storage_schema", "benchmarks"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _run(argv: list, old_tree: Path | None = None) -> str:
    env = dict(os.environ)
    if old_tree is None:
        cmd = [sys.executable, "-m", "attncache.cli.main", *map(str, argv)]
    else:  # the old layout: top-level packages `pipeline` and `cli`, found through PYTHONPATH
        env["PYTHONPATH"] = str(old_tree)
        cmd = [sys.executable, "-m", "cli.main", *map(str, argv)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=old_tree or ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes; a marker's wall-clock `seconds` field is the one thing a re-run changes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if "/units/" in path.as_posix():
                import json
                marker = json.loads(data)
                marker.pop("seconds", None)
                data = json.dumps(marker, sort_keys=True).encode()
            out[path.relative_to(root).as_posix()] = data
    return out


@pytest.mark.slow
def test_a_store_made_before_the_restructure_opens_resumes_verifies_and_trains_identically(tmp_path):
    old = _old_tree(tmp_path)
    data = tmp_path / "d"
    _run(["data", "synth", data, "--num-train", 64, "--num-val", 16, "--image-size", 32, "--shard-size", 16,
          "--seed", 3])
    job = ["precompute", "--data", data / "train-{000000..000003}.tar", *TEACHER, "--views", 2, "--layers", ":",
           "--encoding", "lowrank:r=8:int8",  # the old tree's default; both trees are given it (the default changed)
           "--batch-size", 16, "--workers", 0, "--threads", 1, "--ray", "none", "--quiet"]
    _run([*job, "--out", tmp_path / "old.zarr"], old_tree=old)
    # the old tree fitted every low-rank store by the full eigh, which today's tree names fit=eigh
    new_job = [("lowrank:r=8:int8:fit=eigh" if a == "lowrank:r=8:int8" else a) for a in job]
    _run([*new_job, "--out", tmp_path / "new.zarr"])
    before = _files(tmp_path / "old.zarr")
    assert before == _files(tmp_path / "new.zarr")  # same job, same bytes (markers less their timing)

    resumed = _run([*new_job[:-1], "--out", tmp_path / "old.zarr"])  # without --quiet: the summary names the counts
    assert "0 processed, 8 already done" in resumed
    assert _files(tmp_path / "old.zarr") == before
    assert "8/8 units ok" in _run(["verify", tmp_path / "old.zarr"])

    train = ["train", "--cache", tmp_path / "old.zarr", "--data", data / "train-{000000..000003}.tar", *STUDENT]
    _run([*train, "--out", tmp_path / "run_old"], old_tree=old)
    _run([*train, "--out", tmp_path / "run_new"])
    weights = [hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest()
               for run in ("run_old", "run_new")]
    assert weights[0] == weights[1]
