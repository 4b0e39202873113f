"""`ray job submit -- attncache precompute --ray auto ...` on a real head node with its job server."""
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_ray import TEACHER, _arrays, _free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ATTNCACHE = [sys.executable, "-m", "attncache.cli.main"]  # this interpreter's attncache, whatever is on PATH


def test_precompute_submitted_as_a_ray_job_matches_in_process(tmp_path):
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=96, num_val=4, config=SynthConfig(image_size=32, num_classes=4), shard_size=32, seed=5)
    args = ["precompute", "--data", info["train"], *TEACHER, "--views", "2", "--batch-size", "16", "--threads", "1",
            "--encoding", "lowrank:r=8:int8", "--quiet"]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    subprocess.run([*ATTNCACHE, *args, "--ray", "none", "--out", str(tmp_path / "ref.zarr")], env=env,
                   check=True, capture_output=True)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dashboard = _free_port()
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(_free_port()), "--num-cpus", "2",
                        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                        str(dashboard), "--temp-dir", temp, "--disable-usage-stats"], env=env, check=True,
                       capture_output=True)
        result = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                                 *ATTNCACHE, *args, "--ray", "auto", "--out", str(tmp_path / "job.zarr")],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "samples written: 192" in result.stdout and "succeeded" in result.stdout + result.stderr
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
    assert _arrays(tmp_path / "job.zarr") == _arrays(tmp_path / "ref.zarr")
