"""examples/own_loop.py, the public API in a plain PyTorch loop, runs on a small cache as a user starts it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from relhelp import FAST, TEACHER_ARGS, env, run_cli  # noqa: E402

STUDENT_ARGS = TEACHER_ARGS[3:]  # the teacher's --model-arg pairs: a student of its shape


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_loop")
    assert run_cli("data", "synth", root / "data", "--num-train", "64", "--num-val", "0", "--shard-size", "32",
                   "--num-classes", "4").returncode == 0
    data = str(root / "data" / "train-{000000..000001}.tar")
    made = run_cli("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", root / "c.zarr")
    assert made.returncode == 0, made.stderr
    return root / "c.zarr", data


def test_the_example_loop_trains_a_student_from_the_cache(cache):
    store, data = cache
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py"), "--cache", str(store), "--data", data,
                           *STUDENT_ARGS, "--steps", "6", "--batch-size", "16"], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and lines[3].startswith("step 4 epoch 0 ") and lines[5].startswith("step 6 epoch 1 ")
    assert all(float(line.split(" distill ")[1]) > 0 for line in lines)
