"""Distributed precompute against real Ray, started as users start it (`ray start` on loopback)."""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from attncache.pipeline.store.checks import verify_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TEACHER = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--model-arg", "depth=3", "--model-arg",
           "embed_dim=48", "--model-arg", "img_size=32", "--model-arg", "num_heads=3", "--model-arg", "patch_size=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node on 127.0.0.1, token auth (needed for a node to join), no dashboard."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port = _free_port()
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp,
                    *common], env=env, check=True, capture_output=True)
    try:
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    root = tmp_path_factory.mktemp("rayjob")
    info = synth_dataset(root / "d", num_train=384, num_val=4, config=SynthConfig(image_size=32, num_classes=4), shard_size=32, seed=3)
    args = ["precompute", "--data", info["train"], *TEACHER, "--views", "2", "--batch-size", "16", "--threads", "1",
            "--encoding", "lowrank:r=8:int8", "--quiet"]
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "attncache.cli.main", *args, "--ray", "none", "--out", str(root / "ref.zarr")],
                   env=env, check=True, capture_output=True)
    return root, args


def _arrays(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "views").rglob("*")) if p.is_file()}


def _run(args, env, out, **kw):
    return subprocess.run([sys.executable, "-m", "attncache.cli.main", *args, "--out", str(out)], env=env, capture_output=True,
                          text=True, **kw)


def _start(args, env, out):
    return subprocess.Popen([sys.executable, "-m", "attncache.cli.main", *args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_markers(store: Path, n: int, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and len(list(store.glob("units/*/*.json"))) < n:
        time.sleep(0.05)
    return len(list(store.glob("units/*/*.json")))


def test_local_ray_gives_the_same_bytes_as_in_process(job):
    root, args = job
    result = _run([*args, "--ray", "local"], dict(os.environ), root / "local.zarr")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "samples written: 768" in result.stdout
    assert _arrays(root / "local.zarr") == _arrays(root / "ref.zarr")


def test_two_node_cluster_gives_the_same_bytes_as_in_process(job, cluster):
    root, args = job
    address, env = cluster
    result = _run([*args, "--ray", address], env, root / "two.zarr")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _arrays(root / "two.zarr") == _arrays(root / "ref.zarr")
    assert verify_store(root / "two.zarr").ok


def test_a_worker_killed_mid_job_is_replaced_and_nothing_is_lost(job, cluster):
    root, args = job
    address, env = cluster
    out = root / "killed-worker.zarr"
    proc = _start([*args, "--ray", address], env, out)
    assert _wait_for_markers(out, 2, proc) >= 2
    pids = subprocess.run(["pgrep", "-f", "ray::UnitWorker"], capture_output=True, text=True).stdout.split()
    assert pids, "no Ray teacher actor found"
    os.kill(int(pids[0]), signal.SIGKILL)
    done_at_kill = len(list(out.glob("units/*/*.json")))
    assert done_at_kill < 24, "the kill must land while units are left"
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert verify_store(out).ok
    assert _arrays(out) == _arrays(root / "ref.zarr")


def test_rerunning_after_the_driver_dies_finishes_only_the_remaining_units(job, cluster):
    root, args = job
    address, env = cluster
    out = root / "killed-driver.zarr"
    proc = _start([*args, "--ray", address], env, out)
    _wait_for_markers(out, 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("units/*/*.json")))
    assert 4 <= done < 24, done
    result = _run([*args, "--ray", address], env, out, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    processed, already = map(int, re.search(r"units: (\d+) processed, (\d+) already done", result.stdout).groups())
    # actors of the killed driver may finish a unit before Ray reaps them, so "already done" can
    # exceed what was on disk at the kill; the rerun must process exactly the rest
    assert already >= done and processed == 24 - already
    assert _arrays(out) == _arrays(root / "ref.zarr")


def test_a_unit_that_keeps_failing_is_retried_then_named_and_the_job_fails(tmp_path):
    import io
    import tarfile

    from attncache.pipeline.studies.synth import SynthConfig, synth_dataset

    info = synth_dataset(tmp_path / "d", num_train=64, num_val=4, config=SynthConfig(image_size=32, num_classes=4), shard_size=32, seed=1)
    bad = tmp_path / "d" / "train-000001.tar"
    with tarfile.open(bad, "a") as tar:  # a sample with no label in the second shard
        payload = b"not an image"
        member = tarfile.TarInfo("broken.jpg")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    args = ["precompute", "--data", info["train"], *TEACHER, "--threads", "1", "--on-bad-sample", "fail",
            "--max-retries", "1", "--ray", "local", "--quiet"]
    result = _run(args, dict(os.environ), tmp_path / "f.zarr", timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UnitsFailed: 1 unit(s) failed after 1 retries" in result.stderr
    named = [line for line in result.stderr.splitlines() if "shard 000001 (train-000001.tar)" in line]
    assert len(named) == 1 and "): BadSample: " in named[0] and "broken" in named[0], result.stderr
    assert "RayTaskError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    from attncache.pipeline.store.cache import CacheStore

    store = CacheStore.open(tmp_path / "f.zarr")
    assert store.read_marker(0, 0) is not None and store.read_marker(0, 1) is None


def test_a_worker_shape_no_node_can_host_is_refused_instead_of_hanging(job, cluster):
    root, args = job
    address, env = cluster
    result = _run([*args, "--ray", address, "--cpus-per-worker", "2"], env, root / "too-big.zarr", timeout=120)
    assert result.returncode == 1
    assert "needs 2 CPUs" in result.stderr and "largest Ray node has 1" in result.stderr


def _flaky_worker(attempts: Path, fails, error: Exception):
    """A teacher actor class whose `process` logs each attempt at a unit to a file (one line per try, so
    attempts are counted across actor restarts) and raises `error` while `fails(unit, attempt)`.
    Defined in a function, so Ray ships it to the actors by value."""
    from attncache.pipeline.precompute.ray_runner import UnitWorker

    class Flaky(UnitWorker):
        def process(self, unit):
            log = attempts / f"v{unit.view}-s{unit.shard_index}"
            with open(log, "a") as f:
                f.write("try\n")
            if fails(unit, len(log.read_text().splitlines())):
                raise error
            return UnitWorker.process(self, unit)

    return Flaky


def _config(root: Path, out: Path):
    """The `job` fixture's CLI arguments as a PrecomputeConfig (a resume through the CLI checks they agree)."""
    from attncache.cli.cache_cmd import make_teacher_config
    from attncache.pipeline.precompute.job import PrecomputeConfig

    model_args = [TEACHER[i + 1] for i, a in enumerate(TEACHER) if a == "--model-arg"]
    return PrecomputeConfig(data=(str(root / "d" / "train-{000000..000011}.tar"),), out=str(out),
                            teacher=make_teacher_config(TEACHER[1], model_args, None, True, 0), views=2, batch_size=16,
                            threads=1, encoding="lowrank:r=8:int8", progress=False)


def _tries(attempts: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in attempts.iterdir()}


def test_ray_retries_a_transient_failure_and_names_a_unit_whose_retries_run_out(job, tmp_path):
    """Every unit fails its first try (Ray re-runs it); one unit fails every try: after 1 + 2 tries it
    is named in UnitsFailed, every other unit is written, and a resume makes the store of a clean run."""
    from attncache.pipeline.precompute.ray_runner import RayOptions, UnitsFailed, run_precompute_ray

    root, args = job
    assert args[args.index("--data") + 1] == str(root / "d" / "train-{000000..000011}.tar")
    out = root / "flaky.zarr"
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    worker = _flaky_worker(attempts, lambda unit, n: n == 1 or (unit.view, unit.shard_index) == (1, 5),
                           OSError("flaky disk"))
    with pytest.raises(UnitsFailed) as failed:
        run_precompute_ray(_config(root, out), RayOptions(num_workers=2, max_retries=2), worker=worker)
    assert str(failed.value) == ("1 unit(s) failed after 2 retries:\n"
                                 "  view 1 shard 000005 (train-000005.tar): OSError: flaky disk")
    tries = _tries(attempts)
    assert tries.pop("v1-s5") == 3 and len(tries) == 23 and set(tries.values()) == {2}, tries
    assert len(list(out.glob("units/*/*.json"))) == 23
    result = _run([*args, "--ray", "none"], dict(os.environ), out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "units: 1 processed, 23 already done" in result.stdout
    assert _arrays(out) == _arrays(root / "ref.zarr")


def test_a_refusal_is_never_retried_and_stops_the_job_in_its_own_words(job, tmp_path):
    from attncache.pipeline.encodings.finite import NonFiniteFactors
    from attncache.pipeline.precompute.ray_runner import RayOptions, run_precompute_ray

    root, _ = job
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    worker = _flaky_worker(attempts, lambda unit, n: (unit.view, unit.shard_index) == (0, 0),
                           NonFiniteFactors("teacher layer 1: inf"))
    with pytest.raises(NonFiniteFactors, match="^teacher layer 1: inf$"):
        run_precompute_ray(_config(root, root / "refused.zarr"), RayOptions(num_workers=1, max_retries=2), worker=worker)
    assert _tries(attempts)["v0-s0"] == 1
