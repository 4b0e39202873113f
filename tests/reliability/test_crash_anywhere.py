"""Crash anywhere: precompute SIGKILLed at 10 seeded points, resumed each time, ends byte-identical.

The kill points are armed from the test side (faults.py's launcher, `POINT:N[:torn]`, wrapping the
store's named write stages): the precompute process SIGKILLs itself the N-th time it passes
POINT, so every kill lands exactly where it is meant to, on any machine speed. The points cover
store creation, the start of a unit, the middle of a unit's shard writes (some Zarr shard files
written, the rest not; `torn`: a file cut in half with zarr's `.partial` temp beside it), between
the data and the marker, between the marker's temp file and its rename, and just after a marker.
"""
import random
import signal

import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, run_cli, store_files

pytestmark = pytest.mark.slow

REQUIRED = ["store-create:1", "array-written:3:torn", "data-written:1", "marker-tmp:1"]
POOL = ["unit-start:1", "unit-start:2", "array-written:1", "array-written:6", "array-written:9:torn",
        "data-written:2", "marker-tmp:2", "unit-done:1", "unit-done:2"]


def kill_points(seed: int, count: int = 10) -> list[str]:
    """Store creation first (only a first run passes it), then the required and drawn points shuffled."""
    rng = random.Random(seed)
    rest = REQUIRED[1:] + rng.sample(POOL, count - len(REQUIRED))
    rng.shuffle(rest)
    return [REQUIRED[0]] + rest


def test_sigkill_at_ten_seeded_points_then_resume_is_byte_identical_and_verifies(tmp_path):
    data = noise_shards(tmp_path / "d", 96, shard_size=8, seed=5)
    common = ["precompute", "--data", data, *TEACHER_ARGS, "--views", "2", *FAST, "--ray", "none"]
    ref = invoke(*common, "--out", tmp_path / "ref.zarr")
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "crash.zarr"
    points = kill_points(seed=2026)
    assert len(points) == 10 and set(REQUIRED) <= set(points)
    took_over = 0
    for point in points:
        result = run_cli(*common, "--out", out, fault=point)
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stdout, result.stderr)
        took_over += "took over the lease of a dead or stalled precompute" in result.stdout
    assert (out / "precompute.lease").exists()  # the last victim's lease, left behind
    final = run_cli(*common, "--out", out)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "took over the lease of a dead or stalled precompute" in final.stdout
    assert took_over == 0  # killed runs print their summary only at the end, so none printed it
    assert differing(store_files(tmp_path / "ref.zarr"), store_files(out)) == []  # no stray temp or lease file
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and "24/24 units ok" in verified.output, verified.output
