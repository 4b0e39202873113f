"""The S3 protocol for real: moto's server on 127.0.0.1 (benchmarks/s3server.py), s3fs as the client, the
CLI unmodified with `s3://` URLs and credentials only in the environment.

Shards are uploaded to a bucket; precompute, verify, inspect, train, evaluate, kill + resume and the
lease run against it, and every array the S3 job writes equals the same job's on local disk.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pytest

from relhelp import FAST, TEACHER_ARGS, cli_args, differing, env, invoke, noise_shards, store_files

STUDENT = ["--student", "vit_tiny_patch16_224", *[a for kv in ("img_size=32", "patch_size=8", "depth=3",
                                                               "embed_dim=48", "num_heads=3")
                                                  for a in ("--student-arg", kv)]]
PRE = [*TEACHER_ARGS, *FAST, "--views", "2", "--ray", "none"]


def upload(local_dir: Path, bucket: str) -> None:
    fs = fsspec.filesystem("s3")
    for tar in sorted(local_dir.glob("*.tar")):
        fs.pipe_file(f"{bucket}/{tar.name}", tar.read_bytes())


def s3_store_files(url: str) -> dict[str, bytes]:
    """Every object of an S3 store by its store-relative path; markers without `seconds`, as
    relhelp.store_files does for a local store."""
    fs = fsspec.filesystem("s3")
    base = url[len("s3://"):].rstrip("/")
    out = {}
    for path in sorted(fs.find(base)):
        rel, data = path[len(base) + 1:], fs.cat_file(path)
        parts = rel.split("/")
        if len(parts) >= 3 and parts[-3] == "units" and rel.endswith(".json"):
            marker = json.loads(data)
            marker.pop("seconds")
            data = json.dumps(marker, sort_keys=True).encode()
        out[rel] = data
    return out


def arrays_only(files: dict[str, bytes]) -> dict[str, bytes]:
    """The arrays' bytes and metadata: everything but the root group's metadata and the markers,
    which record the shards' URLs (s3://... against a local path) and so differ by design."""
    return {k: v for k, v in files.items() if k != "zarr.json" and not k.startswith("units/")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of 12 samples on local disk, the brace pattern that names them."""
    out = tmp_path_factory.mktemp("s3shards")
    return out, noise_shards(out, 48, shard_size=12)


def test_precompute_to_s3_equals_local_disk_and_verify_inspect_read_it(s3, shards, tmp_path):
    local_dir, local_pattern = shards
    upload(local_dir, s3.bucket)
    local = invoke("precompute", "--data", local_pattern, *PRE, "--out", tmp_path / "local.zarr")
    assert local.exit_code == 0, local.output
    out = f"{s3.bucket}/cache.zarr"
    remote = invoke("precompute", "--data", f"{s3.bucket}/train-*.tar", *PRE, "--out", out)
    assert remote.exit_code == 0, remote.output
    ref, got = store_files(tmp_path / "local.zarr"), s3_store_files(out)
    assert ref.keys() == got.keys()
    assert differing(arrays_only(ref), arrays_only(got)) == []
    assert len(arrays_only(ref)) > 20
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and "8/8 units ok" in verified.output, verified.output
    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["units_done"] == info["units_total"] == 8 and info["bytes_per_sample"] > 0


@pytest.mark.slow
def test_train_and_evaluate_read_cache_and_shards_from_s3(s3, shards, tmp_path):
    local_dir, _ = shards
    upload(local_dir, s3.bucket)
    data, out = f"{s3.bucket}/train-*.tar", f"{s3.bucket}/cache.zarr"
    assert invoke("precompute", "--data", data, *PRE, "--out", out).exit_code == 0
    trained = invoke("train", "--data", data, "--cache", out, "--out", tmp_path / "run", *STUDENT, "--max-steps", "4",
                     "--batch-size", "8", "--workers", "0", "--threads", "1", "--quiet")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "model.safetensors").is_file()
    evaluated = invoke("evaluate", tmp_path / "run", "--data", data, "--workers", "0", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output)
    assert report["samples"] == 48 and 0 <= report["top1"] <= report["top5"] <= 100


@pytest.mark.slow
def test_sigkill_part_way_on_s3_then_resume_gives_the_same_bytes(s3, shards, tmp_path):
    """A fresh process killed (SIGKILL, faults.py) right after its third unit; the re-run resumes
    with those three kept and ends with the bytes of an uninterrupted run."""
    from relhelp import run_cli

    local_dir, local_pattern = shards
    upload(local_dir, s3.bucket)
    data, out = f"{s3.bucket}/train-*.tar", f"{s3.bucket}/cache.zarr"
    assert invoke("precompute", "--data", data, *PRE, "--out", f"{s3.bucket}/ref.zarr").exit_code == 0
    killed = run_cli("precompute", "--data", data, *PRE, "--out", out, extra_env=s3.env(), fault="unit-done:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("precompute", "--data", data, *PRE[:-1], "none", "--out", out, extra_env=s3.env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "3 already done" in resumed.stdout, resumed.stdout
    ref, got = s3_store_files(f"{s3.bucket}/ref.zarr"), s3_store_files(out)
    assert ref.keys() == got.keys() and differing(ref, got) == []
    assert invoke("verify", out).exit_code == 0


def test_a_second_writer_on_an_s3_store_is_refused_in_one_line(s3, shards):
    """The lease is created with a create-only put (If-None-Match), which moto honours as AWS does:
    while one job holds it, a second precompute is refused before it writes anything."""
    from attncache.pipeline._util.files import Files
    from attncache.pipeline.store.lease import Lease

    local_dir, _ = shards
    upload(local_dir, s3.bucket)
    data, out = f"{s3.bucket}/train-*.tar", f"{s3.bucket}/cache.zarr"
    assert Files(out).exclusive_create()
    with Lease(out):
        second = invoke("precompute", "--data", data, *PRE, "--out", out)
        assert second.exit_code == 1, second.output
        lines = [line for line in second.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "is being written by another precompute" in lines[0], second.output
        assert "ignores create-only writes" not in second.output
        assert not fsspec.filesystem("s3").exists(f"{out}/zarr.json")
    assert invoke("precompute", "--data", data, *PRE, "--out", out).exit_code == 0


def test_of_many_simultaneous_creates_on_s3_exactly_one_wins(s3):
    from concurrent.futures import ThreadPoolExecutor

    from attncache.pipeline._util.files import Files

    root = f"{s3.bucket}/race.zarr"
    with ThreadPoolExecutor(8) as pool:  # one s3fs client per thread (fsspec caches instances per thread)
        won = list(pool.map(lambda i: Files(root).create("precompute.lease", f"writer {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert Files(root).read("precompute.lease") == f"writer {won.index(True)}".encode()


def test_a_server_that_ignores_if_none_match_is_said_in_one_line(s3, shards, monkeypatch):
    """Some S3-compatible servers accept If-None-Match and overwrite anyway: the start-up probe finds
    it, precompute says so in one line and still runs (the lease falls back to read-back)."""
    import s3fs

    from attncache.pipeline._util.files import Files

    real = s3fs.S3FileSystem._pipe_file

    async def ignoring(self, path, data, mode="overwrite", **kwargs):
        return await real(self, path, data, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", ignoring)
    s3fs.S3FileSystem.clear_instance_cache()  # instances bind their sync methods when made
    local_dir, _ = shards
    upload(local_dir, s3.bucket)
    out = f"{s3.bucket}/cache.zarr"
    assert not Files(out).exclusive_create()
    assert Files(out).create("x", b"1") and not Files(out).create("x", b"2")
    ran = invoke("precompute", "--data", f"{s3.bucket}/train-*.tar", *PRE, "--views", "1", "--out", out)
    assert ran.exit_code == 0, ran.output
    notes = [line for line in ran.output.splitlines() if "ignores create-only writes (If-None-Match)" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: {out}:"), ran.output


def test_a_unit_costs_a_few_requests_not_one_per_sample_or_chunk(s3, shards, tmp_path):
    """Counted from the server's request log (benchmarks/s3.py reports the same figures): the
    extra units of a larger job cost one PUT per array (its Zarr shard) plus the marker, and under
    a hundred requests each in all; reading a unit back for training costs under a hundred too."""
    from collections import Counter

    from attncache.benchmarks.s3 import read_epoch

    local_dir, local_pattern = shards
    upload(local_dir, s3.bucket)
    one_view = [*PRE, "--views", "1"]

    def counted(run):
        before = len(s3.requests())
        result = run()
        # the lease's heartbeat (a PUT every --lease-timeout / 4 s) lands in a slow job, not in a unit
        return result, Counter(r.method for r in s3.requests()[before:] if not r.path.endswith("/precompute.lease"))

    half, small = counted(lambda: invoke("precompute", "--data", f"{s3.bucket}/train-{{000000..000001}}.tar",
                                         *one_view, "--out", f"{s3.bucket}/half.zarr"))
    full, large = counted(lambda: invoke("precompute", "--data", f"{s3.bucket}/train-*.tar", *one_view,
                                         "--out", f"{s3.bucket}/cache.zarr"))
    assert half.exit_code == 0 and full.exit_code == 0, full.output
    assert invoke("precompute", "--data", local_pattern, *one_view, "--out", tmp_path / "l.zarr").exit_code == 0
    shard_files = [k for k in store_files(tmp_path / "l.zarr") if "/c/" in k]
    arrays = len(shard_files) // 4  # four units; each owns one Zarr shard file of every array
    per_unit = {m: (large[m] - small[m]) / 2 for m in large}
    assert per_unit["PUT"] == arrays + 1, per_unit  # the unit's shards and its marker, each put once
    assert sum(per_unit.values()) < 100, per_unit
    before = len(s3.requests())
    samples, read = counted(lambda: read_epoch(f"{s3.bucket}/cache.zarr", f"{s3.bucket}/train-*.tar"))
    assert samples == 48 and read["PUT"] == 0
    assert sum(read.values()) / 4 < 100, read
    # each unit's shard files fetched once, whole (checked against the marker and decoded from those bytes)
    shard_objects = Counter((r.method, r.path.split("?")[0]) for r in s3.requests()[before:]
                            if "/cache.zarr/views/" in r.path and "/c/" in r.path)
    assert {method for method, _ in shard_objects} == {"GET"}, shard_objects
    assert len(shard_objects) == len(shard_files) and set(shard_objects.values()) == {1}, shard_objects
