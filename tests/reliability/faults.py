"""The crash tests' kill points, installed from the test side: production code carries no hook.

`install(hit)` wraps the named stages of the write paths (the store's unit write in
pipeline/store/cache.py, the whole-or-nothing rename in pipeline/_util/atomic.py, the checkpoint
write in pipeline/train/checkpoint.py) so that `hit(point, torn_file)` runs each time a process
passes one of the POINTS. `killer("POINT:N[:torn]")` is the `hit` that SIGKILLs the process the
N-th time it passes POINT; with `torn` it first leaves what a kill in the middle of writing
`torn_file` would (half of it as zarr's `.partial` temp file, and the file itself cut to half, as on
a file system without atomic rename). A launcher runs the CLI with the points armed:

    python tests/reliability/faults.py POINT:N[:torn] precompute --data ... --out STORE

and forkrun.py's children arm them the same way (`"fault": "POINT:N"` in a run).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

# point -> where the process is when it passes it
STORE_POINTS = {
    "store-create": "the arrays' metadata written, the root metadata not yet (CacheStore._create_arrays)",
    "unit-start": "the unit's marker deleted, its arrays not yet rewritten (CacheStore._unmark)",
    "array-written": "one of the unit's Zarr shard files written, the next not yet (CacheStore._write_array)",
    "data-written": "every shard file of the unit written, the marker not yet (CacheStore._write_data)",
    "marker-tmp": "the marker's temp file complete and synced, not yet renamed",
    "marker-renamed": "the marker renamed into place",
    "unit-done": "the unit written, marker included (CacheStore.write_unit)",
    "doc-tmp": "an array's resized zarr.json complete as a temp file, not renamed (a shard grow's end)",
    "doc-renamed": "an array's resized zarr.json renamed into place, the root metadata not yet rewritten",
}
TRAIN_POINTS = {
    "spec-tmp": "student.json's temp complete, not renamed", "spec-renamed": "student.json in place",
    "ckpt-written": "a checkpoint written under its temp name (checkpoint.write_checkpoint_temp)",
    "ckpt-tmp": "the checkpoint's temp synced, not renamed", "ckpt-renamed": "the checkpoint renamed, not committed",
    "state-tmp": "state.json's temp complete, not renamed", "state-renamed": "state.json in place: committed",
    "ckpt-cleaned": "the superseded checkpoint deleted (checkpoint.remove_superseded)",
    "model-tmp": "model.safetensors' temp complete, not renamed", "model-renamed": "model.safetensors in place",
}
POINTS = {**STORE_POINTS, **TRAIN_POINTS}
_MARKER = re.compile(r"\d{6}\.json")


def commit_kind(path: Path) -> str | None:
    """Which named file a whole-or-nothing rename commits ("spec" for `spec-tmp` ...), None for others
    (the lease, config.json, model_ema.safetensors, ...)."""
    from attncache.pipeline.train.checkpoint import CHECKPOINT_NAME, STATE_FILE
    from attncache.pipeline.train.loop import MODEL_FILE
    from attncache.pipeline.train.run_identity import SPEC_FILE

    path = Path(path)
    if _MARKER.fullmatch(path.name) and path.parent.parent.name == "units":
        return "marker"
    if path.name == "zarr.json" and "views" in path.parts:
        return "doc"
    if CHECKPOINT_NAME.fullmatch(path.name):
        return "ckpt"
    return {SPEC_FILE: "spec", STATE_FILE: "state", MODEL_FILE: "model"}.get(path.name)


def install(hit, setattr=setattr) -> None:
    """Wrap the write stages so that `hit(point, torn_file)` runs at every point in POINTS. `setattr`:
    pytest's `monkeypatch.setattr` to have the wrappers undone after a test."""
    from attncache.pipeline._util import atomic
    from attncache.pipeline.store.cache import CacheStore
    from attncache.pipeline.train import checkpoint

    def after(owner, name: str, point: str, torn=None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            hit(point, None if torn is None else torn(result, *args))
            return result

        setattr(owner, name, wrapped)

    def torn_shard(_, store, unit, name, rel, block):
        path = store.files.local_path(rel)
        return None if path is None else str(path)

    after(CacheStore, "_create_arrays", "store-create")
    after(CacheStore, "_unmark", "unit-start")
    after(CacheStore, "_write_array", "array-written", torn_shard)
    after(CacheStore, "_write_data", "data-written")
    after(CacheStore, "write_unit", "unit-done")
    after(checkpoint, "write_checkpoint_temp", "ckpt-written", lambda tmp, *_: str(tmp))
    after(checkpoint, "remove_superseded", "ckpt-cleaned")

    real_rename = atomic.rename_into_place

    @functools.wraps(real_rename)
    def rename_into_place(tmp, path):
        kind = commit_kind(path)
        if kind is not None:
            hit(f"{kind}-tmp", str(tmp))
        real_rename(tmp, path)
        if kind is not None:
            hit(f"{kind}-renamed", None)

    setattr(atomic, "rename_into_place", rename_into_place)


def killer(spec: str):
    """The `hit` of `POINT:N[:torn]`: SIGKILL this process the N-th time it passes POINT."""
    point, nth, *mode = spec.split(":")
    if point not in POINTS or mode not in ([], ["torn"]):
        raise ValueError(f"fault {spec!r}: expected POINT:N[:torn] with POINT one of {sorted(POINTS)}")
    hits: Counter = Counter()

    def hit(name: str, torn_file: str | None) -> None:
        if name != point:
            return
        hits[name] += 1
        if hits[name] != int(nth):
            return
        if mode == ["torn"] and torn_file is not None and os.path.isfile(torn_file):
            data = Path(torn_file).read_bytes()
            Path(f"{torn_file}.{'0' * 32}.partial").write_bytes(data[:len(data) // 2])
            Path(torn_file).write_bytes(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    return hit


def main(argv: list[str]) -> None:
    """`faults.py POINT:N[:torn] ARGS...`: `attncache ARGS` with the kill point armed."""
    install(killer(argv[0]))
    from attncache.cli.main import cli

    cli.main(argv[1:], prog_name="attncache")


if __name__ == "__main__":
    main(sys.argv[1:])
