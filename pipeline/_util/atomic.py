"""Whole-or-nothing files for a run directory: temp name, fsync, rename, fsync the folder.

A kill at any instant leaves either the old file or the new one, never half of one (plus, at
worst, a `<name>.tmp-<pid>` temp that `remove_temps` clears). `read_jsonl` reads an appended log
whose last line a kill may have cut short.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

TEMP_MARK = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")


def commit_temp(tmp: Path, path: Path) -> None:
    """fsync `tmp`, then rename it onto `path` (two stages: the crash tests kill between them)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    rename_into_place(tmp, path)


def rename_into_place(tmp: Path, path: Path) -> None:
    """The commit of a whole-or-nothing write: rename the complete temp onto `path`, fsync the folder."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    commit_temp(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def save_figure(fig, path: Path, **savefig_kwargs) -> None:
    """A matplotlib figure, whole or not at all (the format follows the final name's suffix)."""
    path = Path(path)
    tmp = temp_path(path)
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    commit_temp(tmp, path)


def save_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = temp_path(path)
    save_file(tensors, str(tmp))
    commit_temp(tmp, path)


def remove_temps(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete temps `<name>.tmp-*` left by killed writers of the given file names (and of
    versioned names that start with them); only the run's own writer writes beside them."""
    gone = []
    for stale in Path(folder).glob(f"*{TEMP_MARK}*"):
        if stale.is_file() and stale.name.startswith(names):
            stale.unlink(missing_ok=True)
            gone.append(stale)
    return gone


# safetensors (0.8) writes a file through a temp of its own beside it, `.tmp` and 6 letters or digits
# (Rust's tempfile), renamed onto the name it was given: a kill inside `save_file` leaves that temp
_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def remove_safetensors_temps(folder: Path) -> list[Path]:
    """Delete the temps of safetensors writes killed before their rename: in a folder that only the
    run's own writer writes to, such a name is one of them (found by a random-instant kill test)."""
    gone = []
    for stale in Path(folder).glob(".tmp*"):
        if stale.is_file() and _SAFETENSORS_TEMP.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
            gone.append(stale)
    return gone


def read_jsonl(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines log. A last line without its newline is what a
    kill mid-append leaves: it is skipped. Any other line that is not a JSON object is damage
    the user should hear about: ValueError naming the file and line."""
    text = Path(path).read_text(errors="replace")
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if torn_tail and number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record; the log is damaged (move it away to start a "
                             f"fresh one)")
        records.append(record)
    return records
