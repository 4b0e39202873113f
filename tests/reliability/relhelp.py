"""Shared pieces of the reliability suite: the tiny teacher's CLI arguments, running the CLI as users
do (a subprocess, or click's runner in this process), hand-made tar shards, and store comparison."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TEACHER_ARGS = ["--teacher", "vit_tiny_patch16_224", "--random-init", "--model-arg", "depth=3",
                "--model-arg", "embed_dim=48", "--model-arg", "img_size=32", "--model-arg", "num_heads=3",
                "--model-arg", "patch_size=8"]
FAST = ["--batch-size", "16", "--workers", "0", "--threads", "1", "--encoding", "lowrank:r=8:int8", "--quiet"]


def env(**extra) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", **extra)


def cli_args(*args) -> list[str]:
    return [sys.executable, "-m", "attncache.cli.main", *map(str, args)]


def run_cli(*args, extra_env: dict | None = None, timeout: float = 300,
            fault: str | None = None) -> subprocess.CompletedProcess:
    """`attncache ARGS` in a fresh process, as a user starts it; `fault` ("POINT:N[:torn]") runs it
    through faults.py's launcher, which SIGKILLs it at that named point of a write."""
    command = cli_args(*args) if fault is None else [sys.executable, str(Path(__file__).with_name("faults.py")),
                                                     fault, *map(str, args)]
    return subprocess.run(command, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def invoke(*args):
    """`attncache ARGS` through click's runner in this process (fast; exceptions become exit codes)."""
    from click.testing import CliRunner

    from attncache.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def store_files(store_dir) -> dict[str, bytes]:
    """Every file of a store; markers without their timing field, the only thing allowed to differ."""
    root = Path(store_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.parts[-3] == "units" and p.suffix == ".json":
                marker = json.loads(data)
                marker.pop("seconds")
                data = json.dumps(marker, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    """Paths only in one store or with other bytes: empty means byte-identical."""
    return sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k] != b[k])


def noise_shards(out: Path, num: int, shard_size: int, size: int = 32, seed: int = 0, classes: int = 4,
                 prefix: str = "train") -> str:
    """`num` labelled random-colour PNGs in shards of `shard_size` (own generator: the suite does
    not depend on `data synth`'s image style), deterministic in `seed`; returns the brace pattern."""
    import numpy as np

    from attncache.pipeline.data.shards import brace_pattern, shard_writer

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for start in range(0, num, shard_size):
        path = out / f"{prefix}-{start // shard_size:06d}.tar"
        with shard_writer(path) as sink:
            for i in range(start, min(num, start + shard_size)):
                pixels = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
                sink.write({"__key__": f"s{i:07d}", "png": png(Image.fromarray(pixels)),
                            "cls": str(int(rng.integers(classes))).encode()})
        paths.append(path)
    (out / "classes.json").write_text(json.dumps([f"c{i}" for i in range(classes)]))
    return brace_pattern(paths)
