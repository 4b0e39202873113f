"""`precompute --ray local` against the S3 server (moto, benchmarks/s3server.py): the Ray workers read
the shards from and write the units to the bucket, with the credentials and endpoint reaching them only
through the environment they inherit from the driver (never as arguments, never in the store), and the
arrays are byte for byte those of the in-process S3 run and of a local-disk run of the same job.

Only this file and tests/test_ray*.py start Ray clusters; run them one at a time (two clusters on one
machine break each other)."""
import shutil
import tempfile
from pathlib import Path

import fsspec
import pytest

from relhelp import FAST, TEACHER_ARGS, differing, invoke, noise_shards, run_cli, store_files
from test_s3 import arrays_only, s3_store_files, upload

pytestmark = pytest.mark.slow  # a Ray cluster's start-up alone is 10-30 s

JOB = [*TEACHER_ARGS, *FAST, "--views", "2"]


def test_ray_local_to_s3_gives_the_bytes_of_in_process_s3_and_local_disk_and_leaks_no_secret(s3, tmp_path):
    from attncache.benchmarks.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY

    pattern = noise_shards(tmp_path / "d", 36, shard_size=12)
    upload(tmp_path / "d", s3.bucket)
    data = f"{s3.bucket}/train-*.tar"
    local = invoke("precompute", "--data", pattern, *JOB, "--ray", "none", "--out", tmp_path / "local.zarr")
    in_process = invoke("precompute", "--data", data, *JOB, "--ray", "none", "--out", f"{s3.bucket}/in.zarr")
    assert local.exit_code == 0 and in_process.exit_code == 0, local.output + in_process.output
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        ran = run_cli("precompute", "--data", data, *JOB, "--ray", "local", "--out", f"{s3.bucket}/ray.zarr",
                      extra_env={**s3.env(), "RAY_TMPDIR": ray_tmp}, timeout=600)
        assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
        ray_logs = [p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file() and p.suffix in (".log", ".out",
                                                                                                    ".err", ".json")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(ray_logs) > 3  # Ray's own session logs were there to search
    ray_store, in_store = s3_store_files(f"{s3.bucket}/ray.zarr"), s3_store_files(f"{s3.bucket}/in.zarr")
    assert ray_store.keys() == in_store.keys() and differing(ray_store, in_store) == []
    ref = store_files(tmp_path / "local.zarr")
    assert ref.keys() == ray_store.keys() and differing(arrays_only(ref), arrays_only(ray_store)) == []
    assert len([rel for rel in arrays_only(ref) if "/c/" in rel]) == 2 * 3 * 8  # 2 views x 3 shards x 8 arrays
    assert invoke("verify", f"{s3.bucket}/ray.zarr").exit_code == 0
    fs = fsspec.filesystem("s3")
    store_bytes = b"".join(fs.cat_file(p) for p in fs.find(f"{s3.bucket}/ray.zarr"))
    for secret in (SECRET_ACCESS_KEY, ACCESS_KEY_ID):
        assert secret not in ran.stdout + ran.stderr
        assert secret.encode() not in store_bytes
        assert not any(secret.encode() in log for log in ray_logs), secret
