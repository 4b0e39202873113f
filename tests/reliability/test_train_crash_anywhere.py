"""Crash anywhere, training side: `train` SIGKILLed inside every step of its checkpoint write, around
every rename it makes, and at random instants, then re-run as is: the end is bit-identical to an
uninterrupted run (weights, EMA, state, metrics lines), and no temp or stray checkpoint remains.

Kills land where they are meant to on any machine speed: named kill points (`POINT:N[:torn]`,
armed from the test side by faults.py, wrapping the stages of pipeline/train/checkpoint.py and
pipeline/_util/atomic.py), and a hook that SIGKILLs just before / after the N-th `os.replace` (so the
same test runs against any version of the code). The random kills are SIGKILLs at seeded delays
spread over the run's duration; whatever instant they hit, the outcome asserted is the same.
"""
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forkrun import run_many
from relhelp import FAST, TEACHER_ARGS, invoke, noise_shards

STUDENT = ["--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32", "--student-arg", "patch_size=8",
           "--student-arg", "depth=3", "--student-arg", "embed_dim=48", "--student-arg", "num_heads=3"]
STEPS = 20  # 32 samples, batch 8: 4 steps an epoch, 5 epochs over the cache's 2 views


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("crashtrain")
    data = noise_shards(root / "d", 32, shard_size=8, seed=3)
    result = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--views", "2", "--ray", "none",
                    "--out", root / "s.zarr")
    assert result.exit_code == 0, result.output
    return data, root / "s.zarr"


def train_args(cache, out, *extra):
    data, store = cache
    return ["train", "--data", data, "--cache", store, "--out", out, *STUDENT, "--layers", "0:2",
            "--max-steps", STEPS, "--batch-size", 8, "--workers", 0, "--threads", 1, "--quiet",
            "--checkpoint-every", 1, "--log-every", 1, "--model-ema-decay", 0.9, "--drop-path", 0.1,
            "--warmup-epochs", 1, "--clip-grad", 1.0, *extra]


def metrics(run: Path) -> list[dict]:
    """The run's metrics lines without their wall-clock field, the only thing allowed to differ."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_end(ref: Path, run: Path) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state_ref, state = json.loads((ref / "state.json").read_text()), json.loads((run / "state.json").read_text())
    state_ref.pop("metrics_bytes", None), state.pop("metrics_bytes", None)  # the lines' wall-clock fields vary in length
    assert state == state_ref and state["step"] == STEPS  # same checkpoint name: same digest, bit for bit
    assert metrics(run) == metrics(ref)  # every line once: nothing doubled or lost by the kills
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temp, one checkpoint


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    [done] = run_many([{"args": train_args(cache, root / "run")}], root / "logs")
    assert done["rc"] == 0, done["out"] + done["err"]
    return root / "run", done["seconds"]


# kill points inside one checkpoint write, in the order the write passes them (N: the N-th
# checkpoint this process writes, so each killed run first commits N-1 new steps)
NAMED = ["spec-tmp:1:torn",  # student.json half written, before any checkpoint
         "ckpt-written:1:torn",  # the first checkpoint's temp half written, nothing committed yet
         "ckpt-renamed:1",  # the first checkpoint renamed into place, state.json not yet written
         "ckpt-written:2:torn", "ckpt-tmp:2", "ckpt-renamed:2",  # the new file complete, the old state still in force
         "state-tmp:2:torn",  # state.json's temp half written: the old state.json still in force
         "state-renamed:2",  # committed, the superseded checkpoint not yet deleted
         "ckpt-cleaned:3",  # after a whole write
         "model-tmp:1:torn"]  # the final model.safetensors half written, after the last checkpoint


def test_sigkill_at_each_point_of_the_checkpoint_write_then_resume_is_bit_identical(cache, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"

    def torn_metrics_line(_):  # a kill mid-append leaves half a line: the resume must cut it
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 99, "epoch": 0, "lo')

    runs = [{"args": train_args(cache, out), "fault": point} for point in NAMED]
    runs[8]["between"] = torn_metrics_line
    runs.append({"args": train_args(cache, out)})
    results = run_many(runs, tmp_path / "logs")
    for point, result in zip(NAMED, results):
        assert result["rc"] == -signal.SIGKILL, (point, result)
    assert results[-1]["rc"] == 0, results[-1]["out"] + results[-1]["err"]
    assert "Traceback" not in results[-1]["err"]
    assert_same_end(ref, out)
    print("seconds per run:", [round(r["seconds"], 1) for r in results])


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_at_every_rename_then_resume_is_bit_identical(cache, reference, when, tmp_path):
    """Renames 1..8 of a run (student.json, then checkpoint and state.json of each step, ...), each in
    a fresh process that resumes the previous victim's directory; then one run to the end."""
    ref, _ = reference
    out = tmp_path / "run"
    runs = [{"args": train_args(cache, out), "kill_at_replace": f"{when}:{n}"} for n in range(1, 9)]
    results = run_many(runs + [{"args": train_args(cache, out)}], tmp_path / "logs")
    assert all(r["rc"] == -signal.SIGKILL for r in results[:-1]), results
    assert results[-1]["rc"] == 0, results[-1]["out"] + results[-1]["err"]
    assert_same_end(ref, out)


def test_a_safetensors_temp_left_by_a_kill_inside_its_write_is_cleared_by_the_resume(cache, reference, tmp_path):
    """safetensors writes through its own `.tmpXXXXXX` beside the target and renames it: a SIGKILL
    inside `save_file` (of a checkpoint or of the final model) leaves it, and the random-instant kills
    found one. The resume clears it (a finished run re-run as is rewrites its final files); other
    files of the folder stay, and the end is the uninterrupted run's."""
    import shutil

    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    for stray in (".tmpZJkSup", ".tmp0a1B2c"):  # what a killed save_file leaves
        (out / stray).write_bytes(b"half a safetensors file")
    keep = [".tmpnotes.txt", ".tmp-x", "tmpZJkSup", ".tmpZJkSu"]  # not safetensors' names
    for name in keep:
        (out / name).write_text("mine")
    [done] = run_many([{"args": train_args(cache, out)}], tmp_path / "logs")
    assert done["rc"] == 0, done["out"] + done["err"]
    assert not (out / ".tmpZJkSup").exists() and not (out / ".tmp0a1B2c").exists()
    assert all((out / name).read_text() == "mine" for name in keep)
    for name in keep:
        (out / name).unlink()
    assert_same_end(ref, out)


def test_sigkill_at_seeded_random_instants_then_resume_is_bit_identical(cache, reference, tmp_path):
    """Six SIGKILLs at delays drawn over a whole run's duration (seeded); the first ones may land
    before the first checkpoint, the later ones in the middle of any write."""
    ref, seconds = reference
    out = tmp_path / "run"
    rng = random.Random(17)
    delays = sorted(rng.uniform(0.05, seconds) for _ in range(6))
    runs = [{"args": train_args(cache, out), "kill_after_s": d} for d in delays]
    results = run_many(runs + [{"args": train_args(cache, out)}], tmp_path / "logs")
    assert all(r["rc"] in (0, -signal.SIGKILL) for r in results[:-1]), results
    assert results[-1]["rc"] == 0, results[-1]["out"] + results[-1]["err"]
    assert_same_end(ref, out)
