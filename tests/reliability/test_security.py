"""Security: checkpoints never run code, credentials are used but never shown, sample keys never
become paths, and Ray started by attncache listens on 127.0.0.1 only with no dashboard."""
import json
import logging
import os
import pickle
import socket
import uuid

import fsspec
import pytest
import torch
from PIL import Image

from relhelp import FAST, TEACHER_ARGS, invoke, noise_shards, png, write_tar


class Payload:
    """Unpickling this writes a file: what a malicious checkpoint does on `torch.load` without weights_only."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def _evil_checkpoints(tmp_path):
    target = tmp_path / "PWNED"
    raw = tmp_path / "evil.pth"
    raw.write_bytes(pickle.dumps({"model": Payload(target)}))
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(target)}, zipped)  # torch's zip format
    return target, [raw, zipped]


def test_the_payload_really_runs_under_plain_pickle(tmp_path):
    """The control: the same bytes do write the file when unpickled without protection."""
    target, (raw, _) = _evil_checkpoints(tmp_path)
    pickle.loads(raw.read_bytes())
    assert target.read_text() == "pwned"


def test_a_malicious_checkpoint_is_refused_everywhere_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target, checkpoints = _evil_checkpoints(tmp_path)
    data = noise_shards(tmp_path / "d", 8, shard_size=8)
    teacher = TEACHER_ARGS[:2] + TEACHER_ARGS[3:]  # without --random-init
    for ckpt in checkpoints:
        pre = invoke("precompute", "--data", data, *teacher, "--teacher-checkpoint", ckpt, *FAST, "--ray", "none",
                     "--out", tmp_path / "s.zarr")
        assert pre.exit_code == 1 and "TeacherError: refusing to load" in pre.output, pre.output
        assert "weights_only=True" in pre.output
        tune = invoke("train", "--data", data, "--teacher", "vit_tiny_patch16_224", "--teacher-checkpoint", ckpt,
                      "--mode", "finetune", "--student", "vit_tiny_patch16_224", "--student-arg", "img_size=32",
                      "--out", tmp_path / "run", "--max-steps", "1", "--workers", "0", "--quiet")
        assert tune.exit_code != 0 and "refusing to load" in str(tune.output) + str(tune.exception)
    assert not target.exists()
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()


SECRET, KEY_ID, ENV_SECRET = "s3cr3tPassw0rd", "AKIAEXAMPLEKEYID", "envSecretAccessKey123"


def test_credentials_in_urls_and_the_environment_are_never_printed_or_stored(tmp_path, monkeypatch, caplog):
    """fsspec URLs with user:password (memory:// stands in for s3://) and a secret key in the
    environment: used to read and write, and absent from stdout, stderr, logs and every store file.
    Logs are captured at INFO: memory://'s paths are the URL itself, so fsspec's own DEBUG lines name
    them (real backends such as s3fs take credentials out of the path before they log it)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    bucket = f"memory://{KEY_ID}:{SECRET}@bucket-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    local = noise_shards(tmp_path / "d", 16, shard_size=8)
    for i in range(2):
        fs.pipe_file(f"{bucket}/train-{i:06d}.tar", (tmp_path / "d" / f"train-{i:06d}.tar").read_bytes())
    write_tar(tmp_path / "bad.tar", [("broken.png", b"not a png"), ("broken.cls", b"1"),
                                     ("ok.png", png(Image.new("RGB", (8, 8)))),
                                     ("ok.cls", b"0")])
    fs.pipe_file(f"{bucket}/train-000002.tar", (tmp_path / "bad.tar").read_bytes())
    data, out = f"{bucket}/train-{{000000..000002}}.tar", f"{bucket}/cache.zarr"
    outputs = []
    ok = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", out)
    assert ok.exit_code == 0, ok.output
    assert "samples written: 17   skipped: 1" in ok.output and "'broken': undecodable" in ok.output
    outputs += [ok.output]
    outputs += [invoke("verify", out).output, invoke("inspect", out, "--json").output]
    assert json.loads(outputs[-1])["units_done"] == 3
    fail = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--on-bad-sample", "fail",
                  "--out", f"{bucket}/other.zarr")
    assert fail.exit_code == 1 and "BadSample: memory://***@bucket-" in fail.output, fail.output
    missing = invoke("precompute", "--data", f"{bucket}/nothing-000000.tar", *TEACHER_ARGS, *FAST, "--ray", "none",
                     "--out", f"{bucket}/none.zarr")
    assert missing.exit_code == 1 and "memory://***@bucket-" in missing.output, missing.output
    outputs += [fail.output, missing.output, caplog.text]
    store_bytes = b"".join(fs.cat_file(p) for p in fs.find(out))
    assert b"memory://***@bucket-" in store_bytes  # the shard URLs are recorded, redacted
    for secret in (SECRET, KEY_ID, ENV_SECRET):
        leaks = [line for text in outputs for line in text.splitlines() if secret in line]
        assert leaks == [], (secret, leaks[:3])
        assert secret.encode() not in store_bytes, secret


def test_s3_credentials_from_the_environment_are_never_printed_or_stored(s3, tmp_path, caplog):
    """The same against a real S3 server (moto, benchmarks/s3server.py) through s3fs: the secret key
    and key id come from the environment only, and appear in no output, log line or store object,
    neither in this process nor in a fresh CLI process's stdout and stderr. Logs are captured at DEBUG:
    the secret is in none of them; the key id is in botocore's own DEBUG lines (the signed request's
    Authorization header names it, as AWS's does), so it is checked from INFO up."""
    from relhelp import run_cli
    from attncache.benchmarks.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY

    caplog.set_level(logging.DEBUG)
    fs = fsspec.filesystem("s3")
    noise_shards(tmp_path / "d", 16, shard_size=8)
    for i in range(2):
        fs.pipe_file(f"{s3.bucket}/train-{i:06d}.tar", (tmp_path / "d" / f"train-{i:06d}.tar").read_bytes())
    fs.pipe_file(f"{s3.bucket}/bad-000000.tar", b"not a tar")
    data, out = f"{s3.bucket}/train-*.tar", f"{s3.bucket}/cache.zarr"
    ok = invoke("precompute", "--data", data, *TEACHER_ARGS, *FAST, "--ray", "none", "--out", out)
    assert ok.exit_code == 0, ok.output
    outputs = [ok.output, invoke("verify", out).output, invoke("inspect", out, "--json").output]
    bad = invoke("precompute", "--data", f"{s3.bucket}/bad-*.tar", *TEACHER_ARGS, *FAST, "--ray", "none",
                 "--on-bad-sample", "fail", "--out", f"{s3.bucket}/bad.zarr")
    assert bad.exit_code == 1
    fresh = run_cli("inspect", out, "--json", extra_env=s3.env())
    assert fresh.returncode == 0 and json.loads(fresh.stdout)["units_done"] == 2, fresh.stderr[-2000:]
    outputs += [bad.output, fresh.stdout, fresh.stderr]
    debug = [r.getMessage() for r in caplog.records]
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("PutObject" in line for line in debug)  # botocore's DEBUG lines were captured
    store_bytes = b"".join(fs.cat_file(p) for p in fs.find(out))
    assert b"s3://" in store_bytes  # the shard URLs are recorded
    for secret, logs in ((SECRET_ACCESS_KEY, debug), (ACCESS_KEY_ID, info)):
        leaks = [line for text in outputs + logs for line in text.splitlines() if secret in line]
        assert leaks == [], (secret, leaks[:3])
        assert secret.encode() not in store_bytes, secret


def test_ray_started_by_precompute_listens_on_loopback_only_without_a_dashboard():
    """What `--ray local` starts: every listening TCP socket of this session's Ray processes is on
    127.0.0.1, and there is no dashboard URL."""
    import ray

    from attncache.pipeline.precompute.ray_runner import RayOptions, _connect

    try:
        _connect(RayOptions())
        node = ray._private.worker._global_node
        context = node.address_info
        assert context["node_ip_address"] == "127.0.0.1"
        assert not context.get("webui_url")
        assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
        listening = _listening_addresses(_ray_pids(node) | {os.getpid()})
        assert len(listening) >= 3, "found too few Ray listening sockets to check (GCS, raylet, driver)"
        assert {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    finally:
        ray.shutdown()


def _ray_pids(node) -> set[int]:
    return {p.process.pid for procs in node.all_processes.values() for p in procs}


def _listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """(ip, port) of TCP sockets in LISTEN state owned by `pids`, from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:
                continue
            hex_ip, hex_port = local.split(":")
            if len(hex_ip) == 8:
                ip = socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1])
            else:
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1]
                                                                 for i in range(0, 32, 8)))
            found.add((ip, int(hex_port, 16)))
    return found
